import argparse
import json
import logging
import os
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from workqueue.processors import CommandProcessor, load_processor
from workqueue.routing import TaskFilter
from workqueue.worker import Worker
from workqueue.worktrees import WorktreeProcessor


class Command(BaseCommand):
    help = "Claim ready tasks of a queue and process them until none is left (or --batch)."

    def add_arguments(self, parser):
        parser.add_argument("--queue", required=True)
        parser.add_argument("--batch", type=int, default=0, help="tasks to process; 0 = all")
        parser.add_argument(
            "--processor",
            default="noop",
            help="noop, triage, command (with -- CMD ARG ...) or a dotted path",
        )
        parser.add_argument("--prefetch", type=int, default=1, help="tasks claimed at a time")
        parser.add_argument("--lease", type=int, default=settings.HYPERVISOR_LEASE_SECONDS)
        parser.add_argument("--timeout", type=float, default=None, help="seconds per command")
        parser.add_argument("--name", help="worker name (default host:pid)")
        parser.add_argument("--herd", type=int, help="herd id, when started by a herd")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="processors that write files only report what they would do",
        )
        parser.add_argument(
            "--where",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="take only matching tasks (repeatable): project, assignee, "
            "complexity, type, tag, priority (also priority>=N, priority<=N)",
        )
        parser.add_argument("--worktree-repo", help="run each task in its own git worktree")
        parser.add_argument("--worktree-base", default="main", help="branch worktrees start from")
        parser.add_argument(
            "--require-commit",
            action="store_true",
            help="exit 0 without a new commit puts the task back in the queue",
        )
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
        parser.add_argument(
            "argv", nargs=argparse.REMAINDER, help="-- CMD ARG ... for --processor command"
        )

    def handle(self, *args, **options):
        if options["batch"] < 0 or options["prefetch"] < 1 or options["lease"] < 1:
            raise CommandError("--batch must be >= 0, --prefetch and --lease >= 1")
        argv = options["argv"]
        if argv and argv[0] == "--":
            argv = argv[1:]
        if argv and options["processor"] != "command":
            raise CommandError("a command after -- needs --processor command")
        kwargs = {}
        if options["processor"] == "command":
            # Values of these variables (a profile's extra environment) never reach the
            # stored output or the logs.
            masked = os.environ.get("HYPERVISOR_MASK_ENV", "").split(",")
            secrets = [os.environ[name] for name in masked if os.environ.get(name)]
            kwargs = {"timeout": options["timeout"], "secrets": secrets}
        try:
            filters = TaskFilter.parse(options["where"])
            processor = load_processor(options["processor"], argv, **kwargs)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["worktree_repo"]:
            if not isinstance(processor, CommandProcessor):
                raise CommandError("--worktree-repo needs --processor command")
            if not Path(options["worktree_repo"], ".git").exists():
                raise CommandError(
                    f"--worktree-repo {options['worktree_repo']}: not a git checkout"
                )
            processor = WorktreeProcessor(
                processor,
                options["worktree_repo"],
                options["worktree_base"],
                options["require_commit"],
            )
        elif options["require_commit"]:
            raise CommandError("--require-commit needs --worktree-repo")
        logging.getLogger("workqueue").setLevel(
            logging.WARNING if options["verbosity"] < 1 else logging.INFO
        )
        worker = Worker(
            options["queue"],
            processor,
            batch=options["batch"],
            prefetch=options["prefetch"],
            lease_seconds=options["lease"],
            name=options["name"],
            herd=options["herd"],
            dry_run=options["dry_run"],
            filters=filters or None,
        )
        worker.install_signal_handlers()
        code = worker.run()
        summary = {
            "worker": worker.identity.worker,
            "queue": options["queue"],
            "exit_code": code,
            "stop_reason": worker.stop_reason,
            **worker.stats.as_dict(),
        }
        if options["json"]:
            self.stdout.write(json.dumps(summary))
        else:
            self.stdout.write(
                f"{summary['worker']}: {summary['done']} done, {summary['blocked']} blocked, "
                f"{summary['released']} released, {summary['refused']} refused "
                f"in {summary['runtime_seconds']} s"
            )
        sys.exit(code)
