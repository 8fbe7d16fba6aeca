import secrets
from decimal import Decimal

from django import forms
from django.core.exceptions import ValidationError
from django.db.backends.base.operations import BaseDatabaseOperations

from herds.models import MAX_TOKEN_BUDGET, MAX_WALL_CLOCK, Profile, connections_problem
from workqueue.editing import TAG_LIMIT
from workqueue.models import Queue, Task
from workqueue.names import validate_queue_name
from workqueue.routing import FilterError, TaskFilter

MAX_WORKERS = 1000  # past any machine's agents; the profile's own cap is checked too
MAX_BATCH = 1_000_000  # tasks per worker; 0 is "until the queue is empty", however long
# The priority column's portable range, as the import checks a file's (check_columns).
LOWEST, HIGHEST = BaseDatabaseOperations.integer_field_ranges[
    Task._meta.get_field("priority").get_internal_type()
]


def filter_problem(condition) -> str:
    """Why a condition can never match a task: a value longer than its column holds, or
    a priority past the column's range. "" when it can."""
    if condition.field == "priority":
        # Digits counted first: int() refuses a few thousand.
        digits = condition.value.lstrip("-")
        if len(digits) > 10 or not LOWEST <= int(condition.value) <= HIGHEST:
            return f"priority: past any task's priority ({LOWEST} to {HIGHEST})"
        return ""
    if condition.field == "tag":
        limit = TAG_LIMIT
    else:
        limit = Task._meta.get_field(condition.field).max_length
    if len(condition.value) > limit:
        return (
            f"{condition.field}: {len(condition.value):,} characters, longer than any "
            f"task's {condition.field} (at most {limit})"
        )
    return ""


def new_launch_token() -> str:
    return secrets.token_urlsafe(16)


def queue_choices() -> list[tuple[str, str]]:
    return [(name, name) for name in Queue.objects.names()]


class LaunchForm(forms.Form):
    """What a person may choose. Never a command line: the profile holds the command."""

    queue = forms.ChoiceField(validators=[validate_queue_name])
    profile = forms.ModelChoiceField(Profile.objects.all(), to_field_name="name")
    workers = forms.IntegerField(min_value=1, max_value=MAX_WORKERS, initial=4)
    batch = forms.IntegerField(
        min_value=0,
        max_value=MAX_BATCH,
        initial=0,
        help_text="Tasks per worker; 0 works until the queue is empty.",
    )
    where = forms.CharField(
        required=False,
        label="Filters",
        help_text="Optional, space separated: complexity=mechanical project=web",
    )
    token_budget = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_TOKEN_BUDGET,
        help_text="Optional: drain once this many tokens are used.",
    )
    wall_clock_limit = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_WALL_CLOCK,
        label="Wall-clock limit",
        help_text="Optional, seconds: drain once the herd has run this long.",
    )
    cost_budget_usd = forms.DecimalField(
        required=False,
        min_value=Decimal("0.0001"),
        max_digits=12,
        decimal_places=4,
        label="Cost budget (USD)",
        help_text="Optional: drain once the agents report this much spent.",
    )
    resume_after_quota = forms.BooleanField(
        required=False,
        label="Resume after quota",
        help_text="If the herd ends on a quota or rate limit, start it again when the limit "
        "lifts.",
    )

    # One per form shown: the server launches once per token, whatever a double-click or a
    # browser's retry sends again (a post without one, from a script, is launched as sent).
    launch_token = forms.CharField(
        required=False, max_length=64, widget=forms.HiddenInput, initial=new_launch_token
    )

    def __init__(self, data=None, *args, **kwargs):
        if data is not None and not data.get("launch_token"):
            # A pre-flight posted without one: the Start button it shows gets its token.
            data = data.copy()
            data["launch_token"] = new_launch_token()
        super().__init__(data, *args, **kwargs)
        self.fields["queue"].choices = queue_choices()

    def clean_where(self) -> list[str]:
        filters = self.cleaned_data["where"].split()
        try:
            parsed = TaskFilter.parse(filters)
        except FilterError as exc:
            raise ValidationError(str(exc)) from None
        problems = [p for p in map(filter_problem, parsed.conditions) if p]
        if problems:
            raise ValidationError(problems)
        return filters

    def clean(self):
        data = super().clean()
        profile, workers = data.get("profile"), data.get("workers")
        if profile and workers and workers > profile.max_workers:
            self.add_error(
                "workers", f"Profile {profile.name} allows at most {profile.max_workers} workers."
            )
        elif workers and (problem := connections_problem(workers)):
            self.add_error("workers", problem)
        return data
