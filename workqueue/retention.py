"""What a long-lived install lets go of when asked (`manage.py prune`): task events, and
the logs and transcripts of claims and herds, older than a cutoff. Nothing else removes
them: at a few events per claim they are the tables and folders that grow for good.

Never what is in use: the files of a claim still held, the folder of a herd not ended.
What the counters of /metrics say does not change: they are tallies (TransitionTally).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db.models import Min

from herds.models import Herd
from workqueue.models import Task, TaskEvent

# logs/agents/task-<id>-<fence>.log and .transcript.json (workqueue.processors)
CLAIM_FILE = re.compile(r"task-(\d+)-(\d+)\.(?:log|transcript\.json)\Z")
# logs/agents/pull-<host>-<pid>.log: a pull worker's agent (workqueue.pull_agent); one
# still running writes to it as it goes (and would keep its file, unlinked, if not).
PULL_LOG = re.compile(r"pull-.+\.log\Z")


@dataclass
class PruneReport:
    events: int = 0
    claim_files: int = 0
    herd_folders: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def prune(before: datetime, dry_run: bool = False) -> PruneReport:
    report = PruneReport()
    report.events = TaskEvent.objects.prune(events_before(before), dry_run=dry_run)
    prune_claim_files(before, report, dry_run)
    prune_herd_folders(before, report, dry_run)
    return report


def events_before(before: datetime) -> datetime:
    """`before`, or the start of the oldest herd not ended when that is earlier: a herd's
    run summary counts its claims from their events (Herd.claims_given_back)."""
    oldest = Herd.objects.active().aggregate(first=Min("created_at"))["first"]
    return min(before, oldest) if oldest else before


def logs() -> Path:
    return Path(settings.HYPERVISOR_DATA_DIR) / "logs"


def prune_claim_files(before: datetime, report: PruneReport, dry_run: bool) -> None:
    """Agents' logs and transcripts last written before `before`, but a held claim's;
    and pull workers' agents' logs."""
    folder = logs() / "agents"
    if not folder.is_dir():
        return
    held = set(Task.objects.claimed().values_list("id", "fence"))
    cutoff = before.timestamp()
    with os.scandir(folder) as entries:  # a file per claim: never listed whole
        for entry in entries:
            found = CLAIM_FILE.match(entry.name)
            if not (found or PULL_LOG.match(entry.name)):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
            if stat.st_mtime >= cutoff or (found and (int(found[1]), int(found[2])) in held):
                continue
            if not dry_run:
                os.unlink(entry.path)
            report.claim_files += 1
            report.bytes += stat.st_size


def prune_herd_folders(before: datetime, report: PruneReport, dry_run: bool) -> None:
    """The worker logs of herds that ended before `before`."""
    folder = logs() / "herds"
    if not folder.is_dir():
        return
    ended = set(Herd.objects.ended().filter(finished_at__lt=before).values_list("pk", flat=True))
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) not in ended:
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            report.bytes += sum(
                f.stat(follow_symlinks=False).st_size
                for f in os.scandir(entry.path)
                if f.is_file(follow_symlinks=False)
            )
            if not dry_run:
                shutil.rmtree(entry.path)
            report.herd_folders += 1
