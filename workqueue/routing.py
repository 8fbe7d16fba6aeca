"""Task filters for routing: which tasks a worker or a herd may take.

They are applied inside the claim query, so a worker never claims a task it would not take.
`FIELD=VALUE`, `FIELD!=VALUE`, and for priority also `priority>=N` / `priority<=N`
(priority follows P0..P4: a lower number is more urgent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db.models import Q, QuerySet, Value
from django.db.models.functions import StrIndex
from django.db.models.lookups import GreaterThan

TEXT_FIELDS = ("project", "assignee", "complexity", "type")
FIELDS = (*TEXT_FIELDS, "tag", "priority")
SHAPE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|!=|=)\s*(.*?)\s*$")
MAX_CONDITIONS = 50  # far past any real routing


class FilterError(ValueError):
    pass


def field_is(field: str, value: str) -> Q:
    """`field` equals `value`. For a value, also says that the field is not empty: the
    board's index of each field holds only tasks that have one (a claim or finish of the
    many tasks without one writes no entry there), and SQLite uses such a partial index
    only for a query that states its condition in the same words."""
    if value and field in TEXT_FIELDS:
        return Q(**{field: value}) & ~Q(**{field: ""})
    return Q(**{field: value})


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: str

    def q(self) -> Q:
        if self.field == "tag":
            tag = f"|{self.value}|"
            # SQLite's LIKE ignores ASCII case, PostgreSQL's does not: the position check
            # makes a tag match in its own case on both, on the rows LIKE already found.
            q = Q(tag_index__contains=tag) & Q(GreaterThan(StrIndex("tag_index", Value(tag)), 0))
        elif self.field == "priority":
            lookup = {
                "=": "priority",
                "!=": "priority",
                ">=": "priority__gte",
                "<=": "priority__lte",
            }[self.op]
            q = Q(**{lookup: int(self.value)})
        elif self.op == "!=":
            q = Q(**{self.field: self.value})
        else:
            q = field_is(self.field, self.value)
        return ~q if self.op == "!=" else q

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value}"


@dataclass(frozen=True)
class TaskFilter:
    conditions: tuple[Condition, ...] = ()

    @classmethod
    def parse(cls, expressions: list[str] | None) -> TaskFilter:
        if len(expressions or []) > MAX_CONDITIONS:
            # SQLite cannot nest a few hundred conditions (an error page at the pre-flight).
            raise FilterError(f"at most {MAX_CONDITIONS} filters, not {len(expressions):,}")
        conditions = []
        for expression in expressions or []:
            match = SHAPE.match(expression)
            if not match:
                raise FilterError(
                    f"{expression!r} is not FIELD=VALUE (fields: {', '.join(FIELDS)})"
                )
            field, op, value = match.groups()
            if field not in FIELDS:
                raise FilterError(
                    f"{expression!r}: unknown field {field!r} (fields: {', '.join(FIELDS)})"
                )
            if op in (">=", "<=") and field != "priority":
                raise FilterError(f"{expression!r}: only priority takes >= or <=")
            if field == "priority" and not re.fullmatch(r"-?\d+", value):
                raise FilterError(f"{expression!r}: priority is a whole number")
            if field == "tag" and ("|" in value or not value):
                raise FilterError(f"{expression!r}: a tag is a non-empty word")
            if re.search(r"[,;]\s*\w+\s*(=|>=|<=)", value):
                # `a=1,b=2` in one --where or &where= was one condition on "1,b=2".
                raise FilterError(f"{expression!r}: give each condition on its own")
            conditions.append(Condition(field, op, value))
        return cls(tuple(conditions))

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def apply(self, tasks: QuerySet) -> QuerySet:
        for condition in self.conditions:
            tasks = tasks.filter(condition.q())
        return tasks

    def merged(self, other: TaskFilter) -> TaskFilter:
        return TaskFilter(tuple(dict.fromkeys(self.conditions + other.conditions)))

    def as_list(self) -> list[str]:
        return [str(c) for c in self.conditions]
