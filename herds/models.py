"""Profiles (how to work a task), herds (one launch of N workers) and their worker processes."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import IntegrityError, connections, models, transaction
from django.db.models import Count, F, FloatField, OuterRef, Q, Subquery, Sum
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast
from django.urls import reverse
from django.utils import timezone

from hypervisor_site.env import server_secrets_in
from workqueue import clock, cpu_slots, locks
from workqueue.dependencies import stuck
from workqueue.models import EventKind, Status, Task, TaskEvent, TaskQuerySet, consumer_wait
from workqueue.processing import Processor
from workqueue.processors import (
    CommandProcessor,
    is_cpu_bound,
    load_processor,
    not_on_path,
    program_path,
    read_prompt,
)
from workqueue.routing import FilterError, TaskFilter

if TYPE_CHECKING:
    from workqueue import agents

log = logging.getLogger("herds")
# What the launch form and `herd` say after "herd N" when Huey's storage refused a launch.
LAUNCH_UNSENT_SAID = (
    "is made, but Huey's queue could not be reached to launch it: a consumer launches it as "
    "it starts, or within two minutes while one runs"
)


class ProcessorKind(models.TextChoices):
    NOOP = "noop"
    TRIAGE = "triage"
    COMMAND = "command"
    # An agent that claims its own tasks over MCP until QUEUE EMPTY (workqueue.pull_agent).
    PULL = "pull"


TAKES_COMMAND = (ProcessorKind.COMMAND, ProcessorKind.PULL)


class AdapterKind(models.TextChoices):
    GENERIC = "generic", "generic (the profile's command)"
    CLAUDE = "claude", "Claude Code"
    GEMINI = "gemini", "Gemini CLI"
    CODEX = "codex", "Codex CLI"


VERSION_TIMEOUT = 20  # seconds for `CLI --version` in a herd's pre-flight
PREFLIGHT_STUCK = 5  # tasks that can never be claimed a pre-flight names (it counts all)


def validate_command(value) -> None:
    if not isinstance(value, list) or not value:
        raise ValidationError("A command is a non-empty list of strings (an argument list).")
    if not all(isinstance(arg, str) for arg in value) or not value[0].strip():
        raise ValidationError("Every argument is a string and the program is not blank.")


def validate_filters(value) -> None:
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise ValidationError("Filters are a list of strings such as complexity=mechanical.")
    try:
        TaskFilter.parse(value)
    except FilterError as exc:
        raise ValidationError(str(exc)) from None


def validate_env(value) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationError("Extra environment is an object of string names to string values.")


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def validate_pass_env(value) -> None:
    if not isinstance(value, list) or not all(
        isinstance(n, str) and ENV_NAME.match(n) for n in value
    ):
        raise ValidationError("Passed-through environment is a list of variable names.")
    ours = server_secrets_in(value)
    if ours:  # whoever edits a profile
        raise ValidationError(ours)


def validate_arguments(value) -> None:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValidationError("Extra arguments are a list of strings.")


def validate_pattern(value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValidationError(f"Not a regular expression: {exc}") from None


class Profile(models.Model):
    """A named processor configuration. The browser picks one; it never sends a command."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.CharField(max_length=500, blank=True)
    processor = models.CharField(
        max_length=20, choices=ProcessorKind.choices, default=ProcessorKind.NOOP
    )
    command = models.JSONField(
        default=list,
        blank=True,
        help_text='Argument list, never a shell: ["{python}", "agent.py", "{path}"]. '
        "Placeholders: {python} (this interpreter), {base_dir}, and per task "
        "{path}, {key}, {queue}, {title}; for pull, {mcp_config} (Claude's --mcp-config "
        "file), {gemini_settings}, {mcp_url}, {prompt} (the pull-worker prompt).",
    )
    timeout_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Per task; blank for no limit."
    )
    env = models.JSONField(default=dict, blank=True, help_text="Extra environment variables.")
    pass_env = models.JSONField(
        default=list,
        blank=True,
        help_text="Names of the worker's own environment variables the agent may see, "
        'beyond the allow-list: ["ANTHROPIC_API_KEY"].',
    )
    adapter = models.CharField(
        max_length=20,
        choices=AdapterKind.choices,
        default=AdapterKind.GENERIC,
        help_text="How the command's output is read. claude, gemini and codex build their "
        "own command line from the fields below; generic runs the command above.",
    )
    model = models.CharField(max_length=200, blank=True, help_text="The CLI's --model.")
    extra_args = models.JSONField(
        default=list,
        blank=True,
        help_text='More options for the CLI, an argument list: ["--fallback-model", "haiku"].',
    )
    max_turns = models.PositiveIntegerField(
        null=True, blank=True, help_text="Per task, where the CLI has it (Claude Code)."
    )
    max_budget_usd = models.DecimalField(
        max_digits=10,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Per task, in USD, where the CLI has it (Claude Code).",
    )
    prompt_file = models.CharField(
        max_length=1000,
        blank=True,
        help_text="The worker prompt, a markdown template with {key}, {path}, {title}, {queue}; "
        "relative to the project. Blank: prompts/worker.md.",
    )
    prefetch = models.PositiveIntegerField(default=1)
    max_attempts = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Block a task abandoned by dead workers this many times (blank: the queue's).",
    )
    max_workers = models.PositiveIntegerField(default=8)
    quota_pattern = models.CharField(
        max_length=500,
        blank=True,  # checked by clean(), on every save: a validator here said it twice
        help_text="A regular expression that marks output as 'quota or rate limit reached'.",
    )
    filters = models.JSONField(
        default=list, blank=True, help_text='Default task filters: ["complexity=mechanical"].'
    )
    worktree_repo = models.CharField(max_length=1000, blank=True)
    worktree_base = models.CharField(max_length=200, default="main")
    require_commit = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        # Validated on every save, not only in forms: a worker must never get a bad command.
        self.clean()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        errors = {}
        if self.adapter != AdapterKind.GENERIC:
            if self.processor != ProcessorKind.COMMAND:
                errors["adapter"] = ["An agent CLI's adapter needs the command processor."]
            if self.command:
                errors["command"] = [
                    f"The {self.adapter} adapter builds its own command line: leave the "
                    "command empty and put more options in extra args."
                ]
            try:
                read_prompt(self.prompt_file or "prompts/worker.md")
            except ValueError as exc:
                errors["prompt_file"] = [str(exc)]
            if self.adapter != AdapterKind.CLAUDE:
                # Only Claude Code takes these as options: a limit nobody applies is a trap.
                if self.max_turns:
                    hint = ""
                    if self.adapter == AdapterKind.GEMINI:
                        hint = " (Gemini: model.maxSessionTurns in its settings.json)"
                    errors["max_turns"] = [
                        f"The {self.adapter} CLI has no max-turns option{hint}."
                    ]
                if self.max_budget_usd:
                    errors["max_budget_usd"] = [f"The {self.adapter} CLI has no budget option."]
        elif self.processor in TAKES_COMMAND:
            try:
                validate_command(self.command)
            except ValidationError as exc:
                errors["command"] = exc.messages
        elif self.command:
            errors["command"] = ["Only the command and pull processors take a command."]
        for field, check in (
            ("extra_args", validate_arguments),
            ("env", validate_env),
            ("pass_env", validate_pass_env),
            ("filters", validate_filters),
            ("quota_pattern", validate_pattern),
        ):
            try:
                check(getattr(self, field))
            except ValidationError as exc:
                errors[field] = exc.messages
        if self.prefetch < 1:
            errors["prefetch"] = ["At least 1."]
        if self.max_workers < 1:
            errors["max_workers"] = ["At least 1."]
        if errors:
            raise ValidationError(errors)

    def quota_regex(self) -> re.Pattern | None:
        return re.compile(self.quota_pattern, re.IGNORECASE) if self.quota_pattern else None

    def agent_options(self) -> agents.AgentOptions:
        # The adapters load here, not with the models: a worker of a built-in processor
        # never needs them.
        from workqueue import agents

        return agents.AgentOptions(
            model=self.model,
            extra_args=list(self.extra_args),
            max_turns=self.max_turns,
            max_budget_usd=self.max_budget_usd,
            quota_pattern=self.quota_pattern,
        )

    def build_processor(self, timeout: float | None = None, pass_env=()) -> Processor:
        """The processor a worker of this profile runs: adapter, prompt, env and limits."""
        if self.processor != ProcessorKind.COMMAND:
            return load_processor(self.processor)
        return CommandProcessor(
            self.command,
            timeout=timeout or self.timeout_seconds,
            env=dict(self.env),
            pass_env=[*self.pass_env, *pass_env],
            adapter=self.adapter,
            options=self.agent_options(),
            prompt_file=self.prompt_file,
        )

    def agent_check(self) -> dict | None:
        """For an agent CLI: where it is on the PATH its agents get, and its --version.
        `missing` says why a herd of this profile cannot start; for any other command,
        only that (its `--version` could do anything)."""
        if self.adapter == AdapterKind.GENERIC:
            if self.processor != ProcessorKind.COMMAND:
                return None
            try:
                missing = self.build_processor().missing_program()
            except ValueError:  # no command: the profile's own validation says so
                return None
            return {"program": self.command[0], "missing": missing} if missing else None
        from workqueue import agent_tree, agents

        program = agents.adapter_class(self.adapter).program
        env = agent_tree.agent_environment({}, dict(self.env), self.pass_env)
        path = program_path(program, env)
        if path is None:
            return {"program": program, "missing": not_on_path(program)}
        try:
            done = subprocess.run(
                [path, "--version"],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=VERSION_TIMEOUT,
                start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"program": program, "path": path, "missing": f"{program} --version: {exc}"}
        said = (done.stdout or done.stderr).decode("utf-8", "replace").strip()
        version = said.splitlines()[0][:200] if said else ""
        if done.returncode != 0:
            return {
                "program": program,
                "path": path,
                "missing": f"{program} --version failed (exit {done.returncode}): {version}",
            }
        return {"program": program, "path": path, "version": version}


class HerdStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    QUOTA = "quota", "stopped by quota or vendor error"


LAUNCH_FAILED = "launch failed"
# A worker's own giving back of a claim (a reaped claim is the reaper's event).
GIVEN_BACK_BY_WORKER = (EventKind.RELEASED, EventKind.LOCK_BUSY, EventKind.LOCK_FAILED)


class LaunchRepeated(Exception):
    """A launch sent again with a launch token already taken: its herd exists."""

    def __init__(self, herd: Herd):
        super().__init__(f"herd {herd.pk} was launched with this launch token already")
        self.herd = herd


# A launch is a pre-flight and N forks: seconds. One still unfinished after this is dead.
LAUNCH_STALL = timedelta(minutes=2)
ENDED = (HerdStatus.FINISHED, HerdStatus.FAILED, HerdStatus.CANCELLED, HerdStatus.QUOTA)
# PostgreSQL connections a herd leaves to the web, the consumers and everyone else.
CONNECTIONS_LEFT = 10


def connections_problem(size: int) -> str:
    """PostgreSQL: why a herd of `size` workers would take the connections the web and the
    consumers need, or "". Each worker holds one (its heartbeat one more while it beats);
    past max_connections the workers wait and retry, but the board is refused meanwhile."""
    db = connections["default"]
    if db.vendor != "postgresql":
        return ""
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('max_connections')::int, "
            "current_setting('superuser_reserved_connections')::int, "
            "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        )
        most, reserved, used = cursor.fetchone()
    free = most - reserved - used
    if size + CONNECTIONS_LEFT <= free:
        return ""
    return (
        f"A herd of {size} workers needs {size} of the database's connections, and "
        f"PostgreSQL has {free} free now (max_connections {most}, {used} in use, {reserved} "
        f"kept for superusers), of which {CONNECTIONS_LEFT} are left to the web and the "
        f"consumers: launch at most {max(0, free - CONNECTIONS_LEFT)} workers, or raise "
        "max_connections."
    )


class HerdQuerySet(models.QuerySet):
    def pending(self) -> HerdQuerySet:
        return self.filter(status=HerdStatus.PENDING)

    def running(self) -> HerdQuerySet:
        return self.filter(status=HerdStatus.RUNNING)

    def ended(self) -> HerdQuerySet:
        return self.filter(status__in=ENDED)

    def active(self) -> HerdQuerySet:
        return self.filter(status__in=(HerdStatus.PENDING, HerdStatus.RUNNING))

    def count_by_profile_and_status(self) -> dict[tuple[str, str], int]:
        rows = self.values_list("profile__name", "status").annotate(n=Count("id")).order_by()
        return {(profile, status): n for profile, status, n in rows}

    def listed(self) -> HerdQuerySet:
        """The herds list's rows, newest first: two figures of each summary, not the
        summaries (one holds a row per task, and a hundred past herds of 20,000 tasks took
        3 s to parse). Sums by subquery: grouping the herds would group by their summaries
        too (no ordering: it joined the herds again)."""
        workers = HerdWorker.objects.filter(herd=OuterRef("pk")).order_by().values("herd")
        return (
            self.select_related("profile", "created_by")
            .defer("summary", "preflight", "samples")
            .annotate(
                done=Subquery(workers.annotate(n=Sum("done")).values("n")),
                blocked=Subquery(workers.annotate(n=Sum("blocked")).values("n")),
                rate=Cast(KeyTextTransform("items_per_second", "summary"), FloatField()),
                runtime=Cast(KeyTextTransform("runtime_seconds", "summary"), FloatField()),
            )
            .order_by("-id")
        )


# Past any real herd, inside what every database and `timedelta` hold (a wall clock of
# 10**14 s was taken and then broke every supervision pass of its herd).
MAX_WALL_CLOCK = 366 * 24 * 3600  # a year, in seconds
MAX_TOKEN_BUDGET = 10**15


class Herd(models.Model):
    queue = models.CharField(max_length=100)
    profile = models.ForeignKey(Profile, on_delete=models.PROTECT, related_name="herds")
    size = models.PositiveIntegerField(help_text="Workers to start.")
    batch = models.PositiveIntegerField(default=0, help_text="Tasks per worker; 0 = until empty.")
    filters = models.JSONField(default=list, blank=True, validators=[validate_filters])
    status = models.CharField(
        max_length=10, choices=HerdStatus.choices, default=HerdStatus.PENDING
    )
    draining = models.BooleanField(default=False)
    cancel_requested = models.BooleanField(default=False)
    reason = models.TextField(blank=True, help_text="Why it drained, failed or stopped.")
    token_budget = models.PositiveBigIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(MAX_TOKEN_BUDGET)]
    )
    wall_clock_limit = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MaxValueValidator(MAX_WALL_CLOCK)],
        help_text="Seconds; the herd drains when reached.",
    )
    dry_run = models.BooleanField(
        default=False, help_text="Processors that write files only report what they would do."
    )
    cost_budget_usd = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="USD, as the agent CLIs report it; the herd drains when reached.",
    )
    resume_after_quota = models.BooleanField(
        default=False,
        help_text="When it ends on quota, launch a herd of the same shape once the limit lifts.",
    )
    quota_resets_at = models.DateTimeField(null=True, blank=True)
    resume_at = models.DateTimeField(null=True, blank=True, help_text="When the next herd starts.")
    resumed_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="resumed_by"
    )
    # Why the resume after a quota launched nothing (its profile refuses the herd now).
    resume_refused = models.CharField(max_length=500, blank=True)
    webhook_result = models.CharField(max_length=500, blank=True)
    # The launch form's one-time token: the same form sent twice (a double-click, a
    # browser's retry) finds the herd the first launched.
    launch_token = models.CharField(max_length=64, null=True, blank=True, unique=True)
    launch_sent = True  # not a column: False where Herd.launch could not send the launch
    preflight = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    summary = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    # [[seconds since start, tasks finished]] sampled by supervision, for the chart.
    samples = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    # Set once every worker has been started: before that, no live worker does not mean done.
    launched_at = models.DateTimeField(null=True, blank=True)
    # Stamped by every supervision pass, for the page: when the herd was last looked at.
    supervised_at = models.DateTimeField(null=True, blank=True)
    # The consumer process running the launch: once it is gone, so is the launch.
    launch_host = models.CharField(max_length=200, blank=True)
    launch_pid = models.IntegerField(null=True, blank=True)
    launch_started = models.FloatField(null=True, blank=True, help_text="psutil create_time")
    # Workers started in place of crashed or timed-out ones, and why it starts no more.
    replacements = models.PositiveIntegerField(default=0)
    replacements_stopped = models.CharField(max_length=500, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = HerdQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["status"], name="herd_status")]

    def __str__(self) -> str:
        return f"herd {self.pk} ({self.queue}, {self.profile_id and self.profile.name})"

    def get_absolute_url(self) -> str:
        return reverse("herds:detail", args=[self.pk])

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def consumer_wait(self) -> int:
        return consumer_wait(self.status == HerdStatus.PENDING, self.created_at)

    @property
    def unsupervised_minutes(self) -> int:
        """Minutes since a supervision pass last looked at this running herd, once that is
        longer than a few passes' period (no consumer is running: nothing launches or ends
        it), else 0. Read from the row: no query."""
        if self.status != HerdStatus.RUNNING or self.supervised_at is None:
            return 0
        # Passes come every interval, or with Huey's minute tick when the interval is longer.
        period = max(settings.HYPERVISOR_SUPERVISE_INTERVAL, 60)
        silent = (clock.shown_now() - self.supervised_at).total_seconds()
        return max(1, round(silent / 60)) if silent > 2 * period else 0

    @property
    def cores_taken_in_turns(self) -> int | None:
        """The cores its workers take turns on (a processor that works on the CPU alone, more
        workers than cores: workqueue.cpu_slots), or None when each runs as it likes."""
        if cpu_slots.needed(self.size, is_cpu_bound(self.profile.processor)):
            return cpu_slots.cores()
        return None

    @classmethod
    def launch(
        cls,
        queue: str,
        profile: Profile,
        size: int,
        batch: int = 0,
        filters: list[str] | None = None,
        created_by=None,
        token_budget: int | None = None,
        wall_clock_limit: int | None = None,
        dry_run: bool = False,
        cost_budget_usd: Decimal | None = None,
        resume_after_quota: bool = False,
        resumed_from: Herd | None = None,
        launch_token: str | None = None,
    ) -> Herd:
        """Create a herd and enqueue its launch once the row is committed. A launch token
        is taken once: a second launch with it raises LaunchRepeated with the first herd.
        `launch_sent` is False on the herd returned when Huey's storage refused the launch."""
        from herds.tasks import launch_herd

        herd = cls(
            queue=queue,
            profile=profile,
            size=size,
            batch=batch,
            filters=filters or [],
            created_by=created_by,
            token_budget=token_budget,
            wall_clock_limit=wall_clock_limit,
            dry_run=dry_run,
            cost_budget_usd=cost_budget_usd,
            resume_after_quota=resume_after_quota,
            resumed_from=resumed_from,
            launch_token=launch_token or None,
        )
        # The unique column decides who took a token, not a look before the insert (two
        # requests of one double-click arrive together).
        herd.full_clean(validate_unique=False)
        try:
            with transaction.atomic():
                herd.save()
        except IntegrityError:
            earlier = launch_token and cls.objects.filter(launch_token=launch_token).first()
            if not earlier:
                raise
            raise LaunchRepeated(earlier) from None
        # Sent on commit: at once, or when the caller's transaction commits.
        try:
            launch_herd(herd.pk)
        except Exception as exc:
            # Huey's storage is down (Redis stopped, its SQLite file unwritable): the herd
            # is made, and a consumer sends its launch again (herds.tasks.launch_unsent).
            # Why, in one line: `herd` prints this log before its own sentence.
            why = " ".join(str(exc).split()) or type(exc).__name__
            log.warning("herd %s: its launch could not be sent to Huey: %s", herd.pk, why)
            herd.launch_sent = False
        return herd

    def clean(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValidationError({"size": "A herd has at least one worker."})
        if self.profile_id and self.size and self.size > self.profile.max_workers:
            raise ValidationError(
                {
                    "size": f"Profile {self.profile.name} allows at most "
                    f"{self.profile.max_workers} workers."
                }
            )
        if self.size and (problem := connections_problem(self.size)):
            raise ValidationError({"size": problem})

        if self.cost_budget_usd and self.profile_id and not self.reports_cost:
            # Only Claude Code says what a run cost: the budget would never be reached.
            raise ValidationError(
                {
                    "cost_budget_usd": f"Profile {self.profile.name}'s agent "
                    f"({self.profile.adapter}) reports no cost, so a cost budget could "
                    "never stop this herd: give a token budget."
                }
            )

    @property
    def reports_cost(self) -> bool:
        """Whether its agents say what a run cost (Claude Code does; the others give none,
        so their pages say so rather than $0)."""
        from workqueue.agents import adapter_class

        return adapter_class(self.profile.adapter).reports_cost

    def all_filters(self) -> list[str]:
        return list(dict.fromkeys([*self.profile.filters, *self.filters]))

    # Lifecycle. Each transition is a conditional UPDATE: two supervisors may race.
    def start(self) -> bool:
        """Pending to running, once, recording this process as the one that launches it."""
        from herds import processes

        now = clock.now()  # another host's consumer judges the launch by it (launch_lost)
        launcher = {
            "launch_host": settings.HYPERVISOR_HOST,
            "launch_pid": os.getpid(),
            "launch_started": processes.create_time(os.getpid()),
        }
        won = Herd.objects.filter(pk=self.pk, status=HerdStatus.PENDING).update(
            status=HerdStatus.RUNNING, started_at=now, supervised_at=now, **launcher
        )
        if won:
            self.status, self.started_at = HerdStatus.RUNNING, now
            for field, value in launcher.items():
                setattr(self, field, value)
        return bool(won)

    def mark_launched(self) -> None:
        self.launched_at = timezone.now()
        Herd.objects.filter(pk=self.pk, launched_at=None).update(launched_at=self.launched_at)

    def launch_lost(self) -> bool:
        """The launch stopped before it started every worker, and never will.

        On this host the launching consumer is provably gone (pid gone or reused), which a
        restarted consumer sees at once; a launch on another host is given up by the clock.
        """
        from herds import processes

        if self.launched_at is not None or self.started_at is None:
            return False
        here = self.launch_host == settings.HYPERVISOR_HOST and self.launch_pid
        if here and processes.leader(self.launch_pid, self.launch_started) is None:
            return True
        return clock.now() - self.started_at > LAUNCH_STALL

    def drain(self, reason: str) -> bool:
        """Stop claiming; current tasks finish. The first reason given is kept (clipped
        to the workers' column: a reason too long for it failed every supervision pass on
        PostgreSQL)."""
        reason = reason if len(reason) <= 500 else reason[:499] + "…"
        changed = Herd.objects.filter(pk=self.pk, draining=False, status__in=ACTIVE).update(
            draining=True, reason=reason
        )
        self.workers.live().filter(drain_reason="").update(drain_reason=reason)
        if changed:
            self.draining, self.reason = True, reason
        return bool(changed)

    def request_cancel(self, reason: str = "cancelled") -> bool:
        """Ask supervision to end every worker's process tree; a pending herd ends now."""
        if self.status == HerdStatus.PENDING:
            self.cancel_requested = True
            if self.finish(HerdStatus.CANCELLED, reason, from_status=HerdStatus.PENDING):
                Herd.objects.filter(pk=self.pk).update(cancel_requested=True)
                return True
            self.refresh_from_db()
        self.drain(reason)
        changed = Herd.objects.filter(
            pk=self.pk, cancel_requested=False, status=HerdStatus.RUNNING
        ).update(cancel_requested=True)
        self.cancel_requested = True
        return bool(changed)

    def cancel(self, reason: str) -> bool:
        """Request a cancel and have the consumer end the processes now, not next period."""
        from herds.tasks import cancel_herd

        if self.ended or not self.request_cancel(reason):
            return False
        cancel_herd(self.pk)
        return True

    def finish(self, status: str, reason: str = "", from_status: str = HerdStatus.RUNNING) -> bool:
        """Write the run summary and end the herd, once."""
        now = clock.now()
        self.finished_at = now
        self.reason = self.reason or reason
        self.status = status
        summary = self.build_summary()
        won = Herd.objects.filter(pk=self.pk, status=from_status).update(
            status=status, finished_at=now, reason=self.reason, summary=summary, draining=True
        )
        if won:
            self.summary = summary
            if settings.HYPERVISOR_HERD_WEBHOOK or (
                status == HerdStatus.QUOTA and self.resume_after_quota
            ):
                from herds.tasks import herd_ended

                herd_ended(self.pk)  # the webhook and a resume after quota, off this thread
        return bool(won)

    def end_status(self) -> str:
        if self.reason.startswith(LAUNCH_FAILED):
            return HerdStatus.FAILED
        if self.cancel_requested:
            return HerdStatus.CANCELLED
        workers = list(self.workers.all())
        if any(w.exit_class == ExitClass.QUOTA for w in workers):
            return HerdStatus.QUOTA
        if workers and all(w.exit_class == ExitClass.CRASHED for w in workers):
            return HerdStatus.FAILED
        return HerdStatus.FINISHED

    def failure(self) -> str:
        """Why a herd whose every worker crashed failed: the first one's end, in words."""
        first = self.workers.exclude(exit_detail="").order_by("finished_at", "index").first()
        return f"every worker crashed ({first.name}: {first.exit_detail})" if first else ""

    def end_reason(self, status: str) -> str:
        """The reason a herd ends with when nothing (a drain, a cancel) gave one: why it
        failed, after why it stopped replacing its dead workers, if it did."""
        self.refresh_from_db(fields=["replacements", "replacements_stopped"])
        said = [self.replacement_words] if self.replacements_stopped else []
        if status == HerdStatus.FAILED:
            said.append(self.failure())
        return "; ".join(filter(None, said))

    @property
    def replacement_words(self) -> str:
        """ "3 workers replaced; no more replacements: why", for its page and its reason."""
        said = f"{self.replacements} worker{'s' if self.replacements != 1 else ''} replaced"
        if self.replacements_stopped:
            said += f"; no more replacements: {self.replacements_stopped}"
        return said

    def restart_budget(self) -> int:
        """How many workers it may start in place of dead ones over its life."""
        configured = settings.HYPERVISOR_HERD_RESTARTS
        return self.size if configured is None else configured

    def take_replacement(self, worker: HerdWorker) -> bool:
        """Whether to start a worker in place of this dead one: decided once per dead worker
        (a conditional UPDATE of its row: overlapping passes never start two), and only for
        a local worker that crashed or timed out, while the herd runs on (launched, neither
        draining nor cancelled) and tasks are ready for it. A replacement counts against
        the restart budget; once the budget is spent, or a replacement died at its start as
        the worker it replaced may have (a crash loop), the herd starts no more."""
        runs_on = Herd.objects.filter(
            pk=self.pk,
            status=HerdStatus.RUNNING,
            draining=False,
            cancel_requested=False,
            launched_at__isnull=False,
            replacements_stopped="",
        )
        budget = self.restart_budget()
        if not budget or not runs_on.exists() or not self.ready_tasks().exists():
            return False  # a budget of 0 is no replacing at all, and nothing to say
        if self.batch_left(worker.index) == 0:
            return False  # its place's batch is done: a replacement would go past the plan
        decided = (
            HerdWorker.objects.filter(
                pk=worker.pk,
                herd=self,
                host=settings.HYPERVISOR_HOST,
                exit_class__in=REPLACEABLE,
                replacement_decided=False,
            )
            .exited()
            .update(replacement_decided=True)
        )
        if not decided:
            return False
        worker.refresh_from_db(
            fields=["state", "exit_class", "done", "blocked", "started_at", "finished_at"]
        )
        within = Herd.objects.filter(pk=self.pk, replacements__lt=budget)
        spent = f"the restart budget of {budget} is spent"
        if not within.exists():  # said before a crash loop, which would not count
            self.stop_replacements(spent)
            return False
        if worker.replaces_id is not None and worker.died_at_start():
            self.stop_replacements(
                f"{worker.name}, itself a replacement, died {worker.runtime_seconds():.0f} s "
                "after it started with no task finished (a crash loop)"
            )
            return False
        if not within.update(replacements=F("replacements") + 1):
            self.stop_replacements(spent)
            return False
        return True

    def batch_left(self, index: int) -> int | None:
        """The tasks a worker in the place of worker `index` may still finish: the herd's
        batch less what that place's workers (the first, and those started in its place,
        index plus a multiple of the size) finished. None without a batch."""
        if not self.batch:
            return None
        place = index % self.size
        finished = self.workers.annotate(place=F("index") % self.size).filter(place=place)
        spent = finished.aggregate(spent=Sum(F("done") + F("blocked")))["spent"] or 0
        return max(self.batch - spent, 0)

    def stop_replacements(self, why: str) -> None:
        """Start no more replacements, saying why (the first reason is kept)."""
        why = why if len(why) <= 500 else why[:499] + "…"
        if Herd.objects.filter(pk=self.pk, replacements_stopped="").update(
            replacements_stopped=why
        ):
            log.info("herd %s: no more replacements: %s", self.pk, why)

    def planned_tasks(self) -> int:
        ready = int(self.preflight.get("ready", 0))
        if self.batch:
            return min(ready, self.batch * self.size)
        return ready

    def progress_line(self, finished: int) -> str:
        """ "3 of 5 tasks finished", or, once tasks that became ready during the run
        were taken too, "6 finished: 5 ready at the start, 1 unblocked"."""
        planned = self.planned_tasks()
        unblocked = finished - planned
        if unblocked > 0:
            return (
                f"{finished:,} finished: {planned:,} ready at the start, {unblocked:,} unblocked"
            )
        return f"{finished:,} of {planned:,} tasks finished"

    def finished_tasks(self) -> int:
        totals = self.workers.aggregate(done=Sum("done"), blocked=Sum("blocked"))
        return (totals["done"] or 0) + (totals["blocked"] or 0)

    def total_tokens(self) -> int:
        return self.workers.aggregate(t=Sum("tokens"))["t"] or 0

    def total_cost_usd(self) -> Decimal:
        return self.workers.aggregate(c=Sum("cost_usd"))["c"] or Decimal(0)

    def runtime_seconds(self) -> float:
        if not self.started_at:
            return 0.0
        end = self.finished_at or clock.shown_now()
        return round((end - self.started_at).total_seconds(), 3)

    def deadline_passed(self) -> bool:
        return bool(
            self.wall_clock_limit
            and self.started_at
            and (clock.now() - self.started_at).total_seconds() > self.wall_clock_limit
        )

    def budget_spent(self) -> str:
        """Which budget is used up, in words, or ""."""
        if self.token_budget and self.total_tokens() >= self.token_budget:
            return f"token budget of {self.token_budget} reached"
        if self.cost_budget_usd and self.total_cost_usd() >= self.cost_budget_usd:
            return f"cost budget of ${self.cost_budget_usd} reached"
        return ""

    def quota_reached(self, reason: str, resets_at) -> None:
        """A worker's agent hit the quota: note when it lifts (the latest time said), drain."""
        if resets_at is not None:
            Herd.objects.filter(pk=self.pk).filter(
                models.Q(quota_resets_at__isnull=True) | models.Q(quota_resets_at__lt=resets_at)
            ).update(quota_resets_at=resets_at)
        self.drain(reason)

    def schedule_resume(self) -> float | None:
        """After a quota end: the same herd again once the limit lifts (or after a backoff).
        Returns the delay in seconds, or None when nothing is scheduled."""
        from herds.tasks import resume_herd

        if self.status != HerdStatus.QUOTA or not self.resume_after_quota:
            return None
        now = timezone.now()
        backoff = timedelta(seconds=settings.HYPERVISOR_QUOTA_BACKOFF)
        at = self.quota_resets_at if self.quota_resets_at and self.quota_resets_at > now else None
        at = at or now + backoff
        if not Herd.objects.filter(pk=self.pk, resume_at__isnull=True).update(resume_at=at):
            return None  # scheduled already
        self.resume_at = at
        delay = max(0.0, (at - now).total_seconds())
        resume_herd.schedule((self.pk,), delay=delay)
        return delay

    def resume(self) -> Herd | None:
        """The herd of the same shape, once; None if one was launched already, or if its
        profile refuses it now (then `resume_refused` says why, naming the profile)."""
        if self.resumed_by.exists() or self.resume_refused:
            return None
        try:
            return Herd.launch(
                self.queue,
                self.profile,
                self.size,
                batch=self.batch,
                filters=self.filters,
                created_by=self.created_by,
                token_budget=self.token_budget,
                wall_clock_limit=self.wall_clock_limit,
                cost_budget_usd=self.cost_budget_usd,
                resume_after_quota=True,
                resumed_from=self,
            )
        except ValidationError as exc:
            # The profile was changed since (fewer workers, an agent without cost): the
            # launch check refuses the same herd.
            refused = (
                f"Not resumed: profile {self.profile.name} refuses this herd now: "
                + " ".join(exc.messages)
            )
            self.resume_refused = refused if len(refused) <= 500 else refused[:499] + "…"
            Herd.objects.filter(pk=self.pk).update(resume_refused=self.resume_refused)
            return None

    def record_pass(self) -> None:
        """Stamp a supervision pass and add a point to the throughput chart."""
        if not self.started_at:
            return
        point = [round(self.runtime_seconds(), 1), self.finished_tasks()]
        samples = list(self.samples)
        if samples and samples[-1][1] == point[1] and len(samples) > 1:
            samples[-1] = point
        else:
            samples.append(point)
        if len(samples) > 240:
            # Keep the chart cheap: halve the resolution, keep the last point.
            samples = samples[:-1:2] + samples[-1:]
        self.samples, self.supervised_at = samples, clock.now()
        Herd.objects.filter(pk=self.pk).update(samples=samples, supervised_at=self.supervised_at)

    def compute_preflight(self) -> dict:
        """What this herd would find: ready, already complete, waiting, locks held."""
        tasks = Task.objects.filter(queue=self.queue)
        ready_in_queue = tasks.ready().count()
        ready = self.ready_tasks().count()
        held = locks.list_locks(self.queue)
        owners: dict[str, int] = {}
        for lock in held:
            owner = lock.owner or {}
            name = owner.get("worker") or "unknown owner"
            owners[name] = owners.get(name, 0) + 1
        waiting = tasks.waiting().count()
        cannot = stuck(self.queue) if waiting else []
        return {
            "queue": self.queue,
            "ready": ready,
            "filtered_out": ready_in_queue - ready,
            "skipped_complete": tasks.filter(status=Status.DONE).count(),
            "waiting": waiting,
            # Of those, the ones that can never be claimed as things stand (a few named).
            "stuck_count": len(cannot),
            "stuck": [{"key": c.key, "why": c.why} for c in cannot[:PREFLIGHT_STUCK]],
            "claimed": tasks.claimed().count(),
            "blocked": tasks.filter(status=Status.BLOCKED).count(),
            "locks_held": len(held),
            "lock_owners": owners,
            "agent": self.profile.agent_check(),
            "filters": self.all_filters(),
            "at": timezone.now().isoformat(),
        }

    def ready_tasks(self) -> TaskQuerySet:
        """The tasks of its queue and filters ready to claim now."""
        ready = Task.objects.filter(queue=self.queue).ready()
        routing = TaskFilter.parse(self.all_filters())
        return routing.apply(ready) if routing else ready

    def record_preflight(self) -> dict:
        self.preflight = self.compute_preflight()
        Herd.objects.filter(pk=self.pk).update(preflight=self.preflight)
        return self.preflight

    def workers_to_start(self) -> int:
        """No more workers than the ready tasks (or batches of them) can keep busy."""
        ready = int(self.preflight.get("ready", 0))
        needed = -(-ready // self.batch) if self.batch else ready
        return max(0, min(self.size, needed))

    def task_rows(self) -> list[dict]:
        rows = []
        finished = (
            Task.objects.filter(holder_herd=self.pk, status__in=(Status.DONE, Status.BLOCKED))
            .order_by("finished_at", "id")
            .values(
                "key",
                "status",
                "outcome",
                "reason",
                "commit",
                "tokens",
                "cost_usd",
                "holder",
                "result__session_id",
            )
        )
        for task in finished.iterator():
            done = task["status"] == Status.DONE
            row = {
                "task_id": task["key"],
                "status": "success" if done else Status.BLOCKED,
                "worker": task["holder"],
            }
            if task["outcome"]:
                row["outcome"] = task["outcome"]
            if task["reason"]:
                row["reason"] = task["reason"]
            if task["commit"]:
                row["commit"] = task["commit"]
            if task["tokens"]:
                row["tokens"] = task["tokens"]
            if task["cost_usd"] is not None:
                row["cost_usd"] = float(task["cost_usd"])
            if task["result__session_id"]:
                row["session_id"] = task["result__session_id"]
            rows.append(row)
        return rows

    def claims_given_back(self) -> tuple[int, dict[str, int]]:
        """How many tasks its workers claimed, and how many of those claims went back to
        the queue, by the event that took them back: released (the agent's exit 75 or its
        release, a quota, a drained worker's unstarted claims), lock busy or lock failed
        (never started), reaped (a dead worker's). One query over the queue's events."""
        names = self.workers.values_list("name", flat=True)
        actors = [actor for name in names for actor in (name, f"mcp:{name}")]
        by_workers = Q(
            actor__in=actors,
            kind__in=(EventKind.CLAIMED, *GIVEN_BACK_BY_WORKER),
        )
        reaped = Q(kind=EventKind.REAPED, data__herd=self.pk, data__status=Status.QUEUED)
        events = TaskEvent.objects.filter(by_workers | reaped, task__queue=self.queue)
        if self.started_at:
            events = events.filter(at__gte=self.started_at)
        counts = dict(events.values_list("kind").annotate(n=Count("id")).order_by())
        given_back = (*GIVEN_BACK_BY_WORKER, EventKind.REAPED)
        return counts.get(EventKind.CLAIMED, 0), {
            kind.replace("_", " "): counts[kind] for kind in given_back if counts.get(kind)
        }

    def build_summary(self) -> dict:
        rows = self.task_rows()
        claimed, given_back_by = self.claims_given_back()
        by_outcome: dict[str, int] = {}
        for row in rows:
            what = row["status"] if row["status"] == Status.BLOCKED else row.get("outcome", "")
            by_outcome[what or "success"] = by_outcome.get(what or "success", 0) + 1
        runtime = self.runtime_seconds()
        finished = len(rows)
        return {
            "herd": self.pk,
            "queue": self.queue,
            "profile": self.profile.name,
            "size": self.size,
            "batch": self.batch,
            "filters": self.all_filters(),
            "status": self.status,
            "reason": self.reason,
            "preflight": self.preflight,
            "workers": rows,
            "counts": by_outcome,
            "done": sum(1 for r in rows if r["status"] != Status.BLOCKED),
            "blocked": sum(1 for r in rows if r["status"] == Status.BLOCKED),
            # Claims that went back to the queue (exit 75, drain, release, reaped): with done
            # and blocked they add up to what was claimed.
            "given_back": sum(given_back_by.values()),
            "given_back_by": given_back_by,
            "claimed": claimed,
            # Ready in its view as it ended: left by a batch, a drain or a cancel, or a dead
            # worker's claim reaped after the others had found nothing more and stopped.
            "left_ready": self.ready_tasks().count(),
            "worker_processes": [
                w.summary_row() for w in self.workers.select_related("replaces").order_by("index")
            ],
            # Workers started in place of crashed or timed-out ones; why it stopped, if it did.
            "replacements": self.replacements,
            "replacements_stopped": self.replacements_stopped,
            "runtime_seconds": runtime,
            # What the herd spent, as its page and its budget count it: tasks given back
            # (a drain, a quota, exit 75) cost tokens too.
            "total_tokens": self.total_tokens(),
            # null where the agents report no cost: not "free".
            "total_cost_usd": float(self.total_cost_usd()) if self.reports_cost else None,
            "quota_resets_at": self.quota_resets_at.isoformat() if self.quota_resets_at else None,
            "items_per_second": round(finished / runtime, 2) if runtime else 0.0,
            "started": self.started_at.isoformat() if self.started_at else None,
            "finished": self.finished_at.isoformat() if self.finished_at else None,
        }


ACTIVE = (HerdStatus.PENDING, HerdStatus.RUNNING)


class WorkerState(models.TextChoices):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


class ExitClass(models.TextChoices):
    FINISHED = "finished", "finished (no more work or batch reached)"
    CRASHED = "crashed"
    TIMED_OUT = "timed_out", "timed out"
    QUOTA = "quota", "quota, rate limit or vendor error"
    CANCELLED = "cancelled"


# The ends a worker is started again after (not a quota, a cancel or a clean exit).
REPLACEABLE = (ExitClass.CRASHED, ExitClass.TIMED_OUT)
# A worker that dies this soon after its start with no task finished died of its start.
DIED_AT_START_SECONDS = 10


class HerdWorkerQuerySet(models.QuerySet):
    def live(self) -> HerdWorkerQuerySet:
        return self.exclude(state=WorkerState.EXITED)

    def exited(self) -> HerdWorkerQuerySet:
        return self.filter(state=WorkerState.EXITED)

    def crashed(self) -> HerdWorkerQuerySet:
        return self.filter(exit_class=ExitClass.CRASHED)

    def live_by_profile_and_state(self) -> dict[tuple[str, str], int]:
        # Through the active herds (an index on their status), not every worker ever run.
        live = self.live().filter(herd__status__in=ACTIVE)
        rows = live.values_list("herd__profile__name", "state").annotate(n=Count("id"))
        return {(profile, state): n for profile, state, n in rows.order_by()}

    def usage_by_profile(self) -> dict[str, tuple[int, Decimal]]:
        """Profile name -> (tokens, USD) its herds' workers reported."""
        rows = (
            self.values_list("herd__profile__name")
            .annotate(tokens=Sum("tokens"), cost=Sum("cost_usd"))
            .order_by()
        )
        return {profile: (tokens or 0, cost or Decimal(0)) for profile, tokens, cost in rows}


class HerdWorker(models.Model):
    """One `manage.py work` process of a herd."""

    herd = models.ForeignKey(Herd, on_delete=models.CASCADE, related_name="workers")
    index = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    host = models.CharField(max_length=200)
    pid = models.IntegerField(null=True, blank=True)
    process_started = models.FloatField(null=True, blank=True, help_text="psutil create_time")
    log_path = models.CharField(max_length=1000, blank=True)
    state = models.CharField(
        max_length=10, choices=WorkerState.choices, default=WorkerState.STARTING
    )
    exit_code = models.IntegerField(null=True, blank=True)
    exit_class = models.CharField(max_length=10, choices=ExitClass.choices, blank=True)
    exit_detail = models.CharField(max_length=500, blank=True)
    # Set by the herd (drain, cancel, budget) and read by the worker on its next beat.
    drain_reason = models.CharField(max_length=500, blank=True)
    quota_hit = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    current_task = models.CharField(max_length=500, blank=True)
    cpu_percent = models.FloatField(null=True, blank=True)
    cpu_seconds = models.FloatField(null=True, blank=True)
    sampled_at = models.FloatField(null=True, blank=True)
    rss_bytes = models.BigIntegerField(null=True, blank=True)
    children = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    blocked = models.PositiveIntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal(0))
    # By the database's clock, as its heartbeats and end (workqueue.clock): its silence is
    # judged from its start until its first beat, by whichever host's consumer looks.
    started_at = models.DateTimeField(default=clock.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # A worker started in place of a crashed or timed-out one: that one.
    replaces = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replacement"
    )
    # Set by the one supervision pass that decided whether this dead worker is replaced.
    replacement_decided = models.BooleanField(default=False)

    objects = HerdWorkerQuerySet.as_manager()

    class Meta:
        ordering = ["herd", "index"]
        constraints = [
            models.UniqueConstraint(fields=["herd", "index"], name="worker_unique_index")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def heartbeat_age(self) -> float | None:
        if not self.heartbeat_at:
            return None
        return (clock.shown_now() - self.heartbeat_at).total_seconds()

    def runtime_seconds(self) -> float:
        end = self.finished_at or clock.shown_now()
        return round((end - self.started_at).total_seconds(), 3)

    def died_at_start(self) -> bool:
        """It ended within seconds of its start, with no task finished."""
        quick = self.runtime_seconds() < DIED_AT_START_SECONDS
        return self.state == WorkerState.EXITED and quick and not (self.done or self.blocked)

    def record_exit(self, exit_code: int | None, exit_class: str, detail: str = "") -> bool:
        """Mark the process gone, once; a second supervisor finds it already done."""
        now = clock.now()
        won = (
            HerdWorker.objects.filter(pk=self.pk)
            .live()
            .update(
                state=WorkerState.EXITED,
                exit_code=exit_code,
                exit_class=exit_class,
                exit_detail=detail[:500],
                finished_at=now,
                current_task="",
                children=0,
            )
        )
        if won:
            self.state, self.exit_code, self.exit_class = WorkerState.EXITED, exit_code, exit_class
            self.exit_detail, self.finished_at = detail[:500], now
        return bool(won)

    @property
    def exit_words(self) -> str:
        """How the worker ended, as its row says it: a drained worker stopped claiming; it
        did not run out of work."""
        if self.exit_class == ExitClass.FINISHED and self.drain_reason:
            return "finished its tasks, then stopped claiming (drained)"
        return self.get_exit_class_display()

    def classify_exit(self, exit_code: int | None) -> tuple[str, str]:
        if self.quota_hit:
            return (
                ExitClass.QUOTA,
                "quota, rate limit or vendor server error (the herd's reason says which)",
            )
        if exit_code == 0:
            return ExitClass.FINISHED, self.drain_reason
        if exit_code is None:
            return ExitClass.CRASHED, "died without reporting an exit code"
        if exit_code < 0:
            try:
                by = f"{signal.Signals(-exit_code).name} (signal {-exit_code})"
            except ValueError:
                by = f"signal {-exit_code}"
            return ExitClass.CRASHED, f"killed by {by}"
        return ExitClass.CRASHED, f"exited with code {exit_code}"

    def summary_row(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "state": self.state,
            "exit_class": self.exit_class,
            "exit_code": self.exit_code,
            "exit_detail": self.exit_detail,
            "done": self.done,
            "blocked": self.blocked,
            "tokens": self.tokens,
            "cost_usd": float(self.cost_usd),
            "runtime_seconds": self.runtime_seconds(),
            "log": self.log_path,
            "replaces": self.replaces.name if self.replaces_id else None,
        }
