import argparse
import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from tqdm import tqdm

from herds.models import LAUNCH_UNSENT_SAID, Herd, Profile
from hypervisor_site.terminal import PrintableCommand
from workqueue.models import Queue
from workqueue.names import queue_name_argument


def dollars(value: str) -> Decimal:
    """An argparse `type=`: Decimal's own error is not one argparse turns into usage."""
    try:
        amount = Decimal(value)
    except InvalidOperation:
        amount = None
    if amount is None or amount.is_nan():  # NaN compares with nothing: a traceback later
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount in USD")
    return amount


BUDGETS = {
    "--token-budget": "token_budget",
    "--wall-clock": "wall_clock",
    "--cost-budget": "cost_budget",
}


@contextmanager
def ctrl_c_held():
    """Ctrl-C while the herd is made waits until it is made and its launch sent: between
    the row's commit and the launch's enqueue it left a herd no consumer was told of (a
    consumer's next look launches such a herd, herds.tasks.launch_unsent). Yields a list
    that holds True once Ctrl-C was pressed."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    before = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, before)


# The herd's fields, as this command's options name them.
OPTIONS = {
    "size": "--workers",
    "batch": "--batch",
    "filters": "--where",
    "token_budget": "--token-budget",
    "wall_clock_limit": "--wall-clock",
    "cost_budget_usd": "--cost-budget",
}


def said_by_option(exc: ValidationError) -> str:
    """A refused launch in words, each message after the option it is about."""
    if not hasattr(exc, "error_dict"):
        return "; ".join(exc.messages)
    return "; ".join(
        f"{OPTIONS.get(field, field)}: {' '.join(messages)}"
        for field, messages in exc.message_dict.items()
    )


class Command(PrintableCommand):
    help = "Launch a herd of workers on a queue through Huey; --wait follows it to the end."
    # A launch is timed from this command; `manage.py check` and the server run the checks.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--queue", required=True, type=queue_name_argument)
        parser.add_argument("--profile", required=True, help="profile name (see the admin)")
        parser.add_argument("--workers", type=int, required=True)
        parser.add_argument("--batch", type=int, default=0, help="tasks per worker; 0 = all")
        parser.add_argument(
            "--where", action="append", default=[], help="task filter FIELD=VALUE (repeatable)"
        )
        parser.add_argument("--token-budget", type=int, help="drain once this many tokens")
        parser.add_argument("--wall-clock", type=int, help="drain after this many seconds")
        parser.add_argument(
            "--cost-budget", type=dollars, help="drain once the agents report this many USD"
        )
        parser.add_argument(
            "--resume-after-quota",
            action="store_true",
            help="when the herd ends on quota, launch the same herd again once the limit lifts "
            "(at the reset time the agent CLI gave, or after HYPERVISOR_QUOTA_BACKOFF)",
        )
        parser.add_argument("--wait", action="store_true", help="follow the herd to its end")
        parser.add_argument("--json", action="store_true", help="print only the summary JSON")

    def handle(self, *args, **options):
        for option, name in BUDGETS.items():
            if options[name] is not None and not options[name] > 0:
                # As the launch form: 0 read as "no budget" would silently ignore one.
                raise CommandError(f"{option} must be above 0 (leave it out for no budget)")
        missing = Queue.objects.missing(options["queue"])
        if missing:  # a herd on it would end at once, having done nothing
            raise CommandError(missing)
        profile = Profile.objects.filter(name=options["profile"]).first()
        if profile is None:
            names = ", ".join(Profile.objects.values_list("name", flat=True))
            raise CommandError(f"no profile {options['profile']!r}; profiles: {names}")
        try:
            with ctrl_c_held() as pressed:
                herd = Herd.launch(
                    options["queue"],
                    profile,
                    options["workers"],
                    batch=options["batch"],
                    filters=options["where"],
                    token_budget=options["token_budget"],
                    wall_clock_limit=options["wall_clock"],
                    cost_budget_usd=options["cost_budget"],
                    resume_after_quota=options["resume_after_quota"],
                )
        except ValidationError as exc:
            raise CommandError(said_by_option(exc)) from None
        if not herd.launch_sent:
            self.stderr.write(f"herd {herd.pk} {LAUNCH_UNSENT_SAID}")
        if not options["wait"]:
            self.report({"herd": herd.pk, "status": herd.status}, options["json"])
            if pressed:
                sys.exit(130)
            return
        try:
            if not pressed:
                herd = self.follow(herd, show_progress=not options["json"])
        except KeyboardInterrupt:
            pressed.append(True)
        if pressed:
            # Ctrl-C stops a `work` but not a herd: its workers are the consumer's.
            self.stderr.write(
                f"\nstopped following herd {herd.pk}; it goes on: drain or cancel it on the "
                "Herds page"
            )
            sys.exit(130)
        self.report(herd.summary, options["json"])
        if herd.status == "failed":
            sys.exit(1)

    def follow(self, herd: Herd, show_progress: bool) -> Herd:
        bar = None
        hinted = False
        started = time.monotonic()
        while True:
            herd.refresh_from_db()
            if herd.status == "pending" and not hinted and time.monotonic() - started > 10:
                self.stderr.write(
                    f"herd {herd.pk} is still pending: is a Huey consumer (run_huey) running?"
                )
                hinted = True
            if herd.preflight and bar is None and show_progress:
                bar = tqdm(total=herd.planned_tasks(), unit="task", desc=f"herd {herd.pk}")
            if bar is not None:
                finished = herd.finished_tasks()
                if finished > bar.total:
                    # Tasks that became ready during the run: never "6/5".
                    bar.set_postfix_str(f"{finished - herd.planned_tasks()} unblocked")
                    bar.total = finished
                bar.update(finished - bar.n)
            if herd.ended:
                if bar is not None:
                    bar.close()
                return herd
            time.sleep(0.5)

    def report(self, data: dict, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(data))
            return
        if "workers" not in data:
            self.stdout.write(f"herd {data['herd']} launched ({data['status']})")
            return
        # The summary lists every task: a person gets a line per worker and the totals.
        for worker in data["worker_processes"]:
            exit_class = worker["exit_class"] or worker["state"]
            self.stdout.write(
                f"  {worker['name']}: {exit_class} (exit {worker['exit_code']}), "
                f"{worker['done']} done, {worker['blocked']} blocked in "
                f"{worker['runtime_seconds']} s"
                + (f"; {worker['exit_detail']}" if worker["exit_detail"] else "")
                + (f"; replaces {worker['replaces']}" if worker.get("replaces") else "")
                + f"  log: {worker['log']}"
            )
        if data["counts"]:
            counts = ", ".join(f"{n} {what}" for what, n in sorted(data["counts"].items()))
            self.stdout.write(f"  outcomes: {counts}")
        self.stdout.write(
            f"herd {data['herd']} {data['status']}: {data['done']} done, "
            f"{data['blocked']} blocked"
            + (
                f", {data['given_back']} given back (of {data['claimed']} claims)"
                if "given_back" in data
                else ""
            )
            + (f", {data['left_ready']} still ready" if data.get("left_ready") else "")
            + f" in {data['runtime_seconds']} s "
            f"({data['items_per_second']}/s), {data['total_tokens']} tokens, "
            + (
                f"${data['total_cost_usd']:.4f}"
                if data.get("total_cost_usd") is not None
                else "no cost reported"
            )
            + (f"; {data['reason']}" if data.get("reason") else "")
        )
        self.stdout.write(
            f"Every task's outcome is in the run summary: /herds/{data['herd']}/summary.json "
            "(--json prints it here instead)"
        )
