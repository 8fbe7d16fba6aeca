import argparse
import gc
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError
from django.db import connections

from hypervisor_site import privacy
from hypervisor_site.env import MAX_SETTING, server_secrets_in
from hypervisor_site.terminal import PrintableCommand
from workqueue import cpu_slots
from workqueue.cpu_slots import CpuSlot
from workqueue.models import Queue
from workqueue.names import queue_name_argument
from workqueue.processors import CommandProcessor, load_processor
from workqueue.routing import TaskFilter
from workqueue.worker import ParentStops, Worker, WorkerStats
from workqueue.worktrees import WorktreeProcessor

BOUNDED = ("prefetch", "lease", "max_attempts")
# Workers one command forks: each is a process and a database connection, and a typo
# (--workers 5000) must not fork thousands of them. More: more commands, or a herd.
MAX_WORKERS = 256


def cpu_slot(path) -> CpuSlot:
    return CpuSlot(path, settings.HYPERVISOR_CPU_TURN_MS / 1000)


def number_out_of_range(options) -> str:
    """'--FLAG VALUE: what it takes' for the first number given that makes no sense."""
    if options["batch"] < 0:
        return f"--batch {options['batch']}: give 0 (every task) or more"
    for name in ("prefetch", "lease", "workers", "max_attempts"):
        if options[name] is not None and options[name] < 1:
            return f"--{name.replace('_', '-')} {options[name]}: give 1 or more"
    timeout = options["timeout"]
    if timeout is not None and not 0 < timeout < math.inf:
        return f"--timeout {timeout:g}: give a number of seconds above 0"
    return ""


def no_dry_run(processor: str) -> str:
    return (
        f"--dry-run: the {processor} processor has no dry run (it would do the work and "
        "mark its tasks done); only triage reports what it would do"
    )


class Command(PrintableCommand):
    help = "Claim ready tasks of a queue and process them until none is left (or --batch)."
    # Workers start often and in herds; `manage.py check` and the server run the checks.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--queue", required=True, type=queue_name_argument)
        parser.add_argument("--batch", type=int, default=0, help="tasks to process; 0 = all")
        parser.add_argument(
            "--processor",
            help="noop (the default), triage, command (with -- CMD ARG ...), pull (an agent "
            "that claims its own tasks over MCP, with -- CMD ARG ...) or a dotted path",
        )
        parser.add_argument(
            "--profile",
            help="work as a herd of this profile would: its processor or agent CLI, prompt, "
            "environment, limits and filters",
        )
        parser.add_argument(
            "--prefetch", type=int, help="tasks claimed at a time (default 1, or the profile's)"
        )
        parser.add_argument("--lease", type=int, default=settings.HYPERVISOR_LEASE_SECONDS)
        parser.add_argument("--timeout", type=float, default=None, help="seconds per command")
        parser.add_argument("--name", help="worker name (default host:pid)")
        parser.add_argument("--herd", type=int, help="herd id, when started by a herd")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="triage reports what it would do and writes nothing; other processors refuse it",
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
        parser.add_argument(
            "--workers", type=int, default=1, help="fork this many workers from one loaded process"
        )
        parser.add_argument(
            "--pass-env",
            action="append",
            default=[],
            metavar="NAME",
            help="let the agent see this variable of the worker's environment (repeatable); "
            "it sees only PATH, HOME, USER, LANG, LC_*, TERM, TZ, TMPDIR otherwise",
        )
        parser.add_argument(
            "--max-attempts",
            type=int,
            default=None,
            help="block a task once dead workers have lost it this many times (below the "
            "queue's own limit only; a profile's limit is the default)",
        )
        parser.add_argument(
            "--cpu-slot",
            metavar="FILE",
            help="work batches only while holding this lock file (herds set it: workers of a "
            "CPU-bound processor take turns on the cores, of HYPERVISOR_CPU_TURN_MS)",
        )
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")
        parser.add_argument(
            "argv", nargs=argparse.REMAINDER, help="-- CMD ARG ... for --processor command"
        )

    def handle(self, *args, **options):
        if not gc.isenabled():
            # manage.py kept the collector off while Django loaded; what loaded stays for
            # good, so later collections leave it out.
            gc.freeze()
            gc.enable()
        argv = options["argv"]
        if argv and argv[0] == "--":
            argv = argv[1:]
        profile = self.profile(options, argv)
        if options["prefetch"] is None:
            options["prefetch"] = profile.prefetch if profile else 1
        if wrong := number_out_of_range(options):
            raise CommandError(wrong)
        # Past a database integer a claim fails on its column (or a lease on the date).
        too_big = [n for n in BOUNDED if (options[n] or 0) > MAX_SETTING]
        if too_big:
            names = ", ".join("--" + n.replace("_", "-") for n in too_big)
            raise CommandError(f"{names}: at most {MAX_SETTING:,}")
        if options["workers"] > MAX_WORKERS:
            raise CommandError(
                f"--workers {options['workers']}: one command forks at most {MAX_WORKERS} "
                "workers; start more commands for more"
            )
        if refused := server_secrets_in(options["pass_env"]):
            raise CommandError(f"--pass-env {refused}")
        options["processor"] = options["processor"] or "noop"
        if argv and options["processor"] not in ("command", "pull"):
            raise CommandError("a command after -- needs --processor command or pull")
        if options["processor"] == "pull" or (profile and profile.processor == "pull"):
            if options["dry_run"]:
                raise CommandError(no_dry_run("pull"))
            return self.run_pull_worker(options, argv, profile)
        try:
            filters = TaskFilter.parse([*(profile.filters if profile else []), *options["where"]])
            processor = (
                profile.build_processor(options["timeout"], options["pass_env"])
                if profile
                else load_processor(options["processor"], argv, **self.command_options(options))
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["dry_run"] and not processor.has_dry_run:
            raise CommandError(no_dry_run(processor.name))
        missing = isinstance(processor, CommandProcessor) and processor.missing_program()
        if missing:  # every task claimed would be blocked for it
            raise CommandError(f"{missing}: no task was claimed")
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
        missing = "" if options["herd"] else Queue.objects.missing(options["queue"])
        if missing:  # not an error: a worker ends on an empty queue, and tasks may come later
            self.stderr.write(f"warning: {missing}")
        settings_for_worker = {
            "batch": options["batch"],
            "prefetch": options["prefetch"],
            "lease_seconds": options["lease"],
            "herd": options["herd"],
            "dry_run": options["dry_run"],
            "filters": filters or None,
            "max_attempts": options["max_attempts"] or (profile.max_attempts if profile else None),
            "cpu_slot": cpu_slot(options["cpu_slot"]) if options["cpu_slot"] else None,
        }
        if options["workers"] > 1:
            summaries = self.fork_workers(options, processor, settings_for_worker)
        else:
            summaries = [self.run_worker(options, processor, settings_for_worker, options["name"])]
        try:
            for summary in summaries:
                self.write_summary(summary, options["json"])
            if not options["herd"] and not sum(s.get("claimed", 0) for s in summaries):
                self.why_nothing_was_ready(options["queue"], options["where"])
            sys.stdout.flush()
        except OSError:
            # The output (a herd worker's log on a full disk) cannot take the summary: the
            # work is done and recorded, and a lost report is no crash. What is still
            # buffered goes nowhere rather than fail the exit (Python's code 120).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        sys.exit(max(s["exit_code"] for s in summaries))

    def write_summary(self, summary: dict, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(summary))
            return
        self.stdout.write(
            f"{summary['worker']}: {summary['done']} done, {summary['blocked']} "
            f"blocked, {summary['released']} released, {summary['refused']} refused "
            f"in {summary['runtime_seconds']} s (database write lock: waited "
            f"{summary['writer_wait_seconds']} s, held {summary['writer_hold_seconds']} s)"
        )

    def why_nothing_was_ready(self, queue: str, where: list[str]) -> None:
        """A worker that found nothing while tasks are queued says why: its --where left
        out the ready ones, their files are missing, or they wait on dependencies."""
        from workqueue.dependencies import stuck
        from workqueue.models import Task, waiting_by_queue

        ready = Task.objects.filter(queue=queue).ready().count() if where else 0
        if ready:
            tasks_are = "task is" if ready == 1 else "tasks are"
            self.stderr.write(
                f"nothing matched --where {' '.join(where)}: {ready} ready {tasks_are} "
                f"in queue {queue!r} outside it"
            )
            return
        missing = Task.objects.filter(queue=queue, source_missing=True).queued().count()
        if missing:
            tasks_wait = "task waits" if missing == 1 else "tasks wait"
            self.stderr.write(
                f"{missing} queued {tasks_wait} for a file missing on disk: put it back "
                "and import again, or close the task"
            )
        waiting = waiting_by_queue().get(queue, 0)
        if not waiting:
            return
        tasks_wait = "task waits" if waiting == 1 else "tasks wait"
        line = f"nothing was ready: {waiting} queued {tasks_wait} on dependencies not done"
        cannot = len(stuck(queue))
        if cannot:
            line += f"; {cannot} cannot become ready as things stand"
        self.stderr.write(f"{line} (python manage.py queue_stats --queue {queue} says which)")

    def profile(self, options, argv):
        """The profile named by --profile, its routing and isolation put in `options`."""
        if not options["profile"]:
            return None
        from herds.models import Profile

        if options["processor"] or argv:
            raise CommandError("--profile brings its own processor: drop --processor and --")
        profile = Profile.objects.filter(name=options["profile"]).first()
        if profile is None:
            names = ", ".join(Profile.objects.values_list("name", flat=True))
            raise CommandError(f"no profile {options['profile']!r}; profiles: {names}")
        if profile.worktree_repo and not options["worktree_repo"]:
            options["worktree_repo"] = profile.worktree_repo
            options["worktree_base"] = profile.worktree_base
        options["require_commit"] = options["require_commit"] or profile.require_commit
        return profile

    def command_options(self, options) -> dict:
        if options["processor"] != "command":
            return {}
        # A profile's extra environment named by whoever started us: the agent gets it,
        # and its values never reach the stored output.
        profile_env = [n for n in os.environ.get("HYPERVISOR_MASK_ENV", "").split(",") if n]
        return {"timeout": options["timeout"], "pass_env": profile_env + options["pass_env"]}

    def run_worker(self, options, processor, worker_settings, name, parent_stops=None) -> dict:
        worker = Worker(options["queue"], processor, name=name, **worker_settings)
        worker.install_signal_handlers(parent_stops)
        privacy.adopt_orphans()  # per process: a fork does not inherit it
        code = worker.run()
        return {
            "worker": worker.identity.worker,
            "queue": options["queue"],
            "exit_code": code,
            "stop_reason": worker.stop_reason,
            **worker.stats.as_dict(),
        }

    def fork_workers(self, options, processor, worker_settings) -> list[dict]:
        """N workers forked from this process: Django is loaded once, not N times."""
        if processor.writes_status:
            # What each child's first finish would import on its own: 8 workers paid
            # 0.1-0.2 s each, on the cores their siblings work on.
            import workqueue.editing  # noqa: F401
        connections.close_all()
        # Keep the loaded modules out of the children's garbage collections: a collection
        # touches every object and so copies the whole heap into each child page by page.
        gc.freeze()
        context = multiprocessing.get_context("fork")
        base = options["name"]
        slots_dir = None
        if cpu_slots.needed(options["workers"], processor.cpu_bound):
            slots_dir = tempfile.TemporaryDirectory(prefix="hypervisor-cpu-")

        def child(index: int, pipe) -> None:
            name = f"{base}-{index}" if base else None
            if slots_dir is not None:
                worker_settings["cpu_slot"] = cpu_slot(
                    cpu_slots.slot_path(Path(slots_dir.name), index)
                )
            summary = self.run_worker(options, processor, worker_settings, name, stops)
            connections.close_all()
            pipe.send(summary)

        stops = ParentStops(context)
        # Until a child has its handler, a notice must not end it (SIGUSR1's default).
        before = signal.signal(stops.notice, signal.SIG_IGN)
        children = []
        for index in range(options["workers"]):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=child, args=(index, writer))
            process.start()
            writer.close()  # the child holds the only writer: its exit ends our read
            children.append((process, reader))
        signal.signal(stops.notice, before)

        def forward(signum, frame):
            stops.record(signum)
            for process, _ in children:
                if process.pid and process.exitcode is None:
                    os.kill(process.pid, stops.notice)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        summaries = []
        for process, reader in children:
            try:
                summaries.append(reader.recv())
            except EOFError:
                process.join()
                summaries.append(
                    {
                        "worker": f"pid {process.pid}",
                        "exit_code": abs(process.exitcode or 1),
                        "stop_reason": "died without a summary",
                        **WorkerStats().as_dict(),  # its own counts died with it
                    }
                )
            process.join()
        if slots_dir is not None:
            slots_dir.cleanup()
        return summaries

    def run_pull_worker(self, options, argv, profile) -> None:
        """One agent that claims its own tasks over MCP (workqueue.pull_agent)."""
        from workqueue.pull_agent import run_pull_worker

        argv = list(profile.command) if profile else argv
        if not argv:
            raise CommandError("--processor pull needs the agent's command after --")
        if options["workers"] > 1 or options["worktree_repo"]:
            raise CommandError("--processor pull takes neither --workers nor --worktree-repo")
        try:
            filters = TaskFilter.parse([*(profile.filters if profile else []), *options["where"]])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        profile_env = [n for n in os.environ.get("HYPERVISOR_MASK_ENV", "").split(",") if n]
        code, summary = run_pull_worker(
            options["queue"],
            argv,
            name=options["name"],
            herd=options["herd"],
            filters=filters or None,
            lease_seconds=options["lease"],
            timeout=options["timeout"] or (profile.timeout_seconds if profile else None),
            env=dict(profile.env) if profile else {},
            pass_env=[*(profile.pass_env if profile else []), *profile_env, *options["pass_env"]],
            max_attempts=options["max_attempts"] or (profile.max_attempts if profile else None),
            batch=options["batch"],
        )
        self.stdout.write(json.dumps(summary) if options["json"] else str(summary))
        sys.exit(code)
