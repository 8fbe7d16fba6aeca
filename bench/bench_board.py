"""Board speed with 100,000 tasks: full render, no-change live refresh, page weight, and
every filter alone and combined with free text, warm and on the first render after a change.

Runs on a throwaway database (SQLite under the data folder, or a `_bench_board` database
next to DATABASE_URL's), so no real data is touched. `python bench/bench_board.py [TASKS]`
prints JSON; bench/run.py calls run(). Each timing is the median of several renders through
the Django test client, logged in.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"render_ms": 100, "refresh_ms": 10, "page_bytes": 200_000, "filtered_ms": 100}
# Bodies of 40 words from a vocabulary of 3,000; one body in 200 says "webhook retry".
VOCABULARY = [
    f"{a}{b}{c}"
    for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu", "ve", "zo")
    for b in ("bra", "cle", "dri", "fro", "gli", "pla", "sna", "tre", "vlo", "wha")
    for c in (
        "n",
        "st",
        "ck",
        "rd",
        "mp",
        "x",
        "ll",
        "ft",
        "ng",
        "sh",
        "ble",
        "ment",
        "ness",
        "ing",
        "ed",
        "er",
        "ly",
        "ion",
        "ous",
        "al",
        "ity",
        "ive",
        "ize",
        "ful",
        "less",
        "ward",
        "wise",
        "like",
        "ship",
        "dom",
    )
]
# Each filter alone, then with free text; the text finds body words, titles and keys.
FILTERS = {
    "tag": {"tag": "auth"},
    "assignee": {"assignee": "ann"},
    "project": {"project": "project-3"},
    "complexity": {"complexity": "large"},
    "text_title": {"q": "number 4242"},
    "text_key": {"q": "bench-00777"},
    "text_body": {"q": "webhook retry"},
    "text_common": {"q": "area"},
    "text_short": {"q": "ui"},
    "tag+text": {"tag": "auth", "q": "webhook retry"},
    "all_fields": {
        "tag": "auth", "assignee": "ann", "project": "project-3", "complexity": "large",
    },
    "all_fields+text": {
        "tag": "auth", "assignee": "ann", "project": "project-3", "complexity": "large",
        "q": "webhook",
    },
    "queue+tag+assignee": {"queue": "bench", "tag": "auth", "assignee": "ann"},
}  # fmt: skip


def _setup_django() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hypervisor_site.settings")
    import django

    django.setup()


def _fill(count: int) -> None:
    from django.utils import timezone

    from workqueue.models import Queue, Task

    rng = random.Random(4)
    now = timezone.now()
    statuses = ["done"] * 80 + ["queued"] * 15 + ["blocked"] * 4 + ["claimed"]
    projects = [f"project-{i}" for i in range(20)]
    Queue.objects.get_or_create(name="bench")
    batch = []
    for i in range(count):
        status = rng.choice(statuses)
        tags = rng.sample(["bug", "auth", "docs", "ui", "infra", "perf"], 2)
        batch.append(
            Task(
                queue="bench" if i % 10 else "other",
                key=f"bench-{i:07d}",
                title=f"Task number {i} about {tags[0]} in the {tags[1]} area",
                status=status,
                priority=rng.randint(0, 4),
                project=rng.choice(projects),
                assignee=rng.choice(["", "bot", "ann", "bo"]),
                complexity=rng.choice(["", "small", "medium", "large"]),
                tags=tags,
                tag_index="|" + "|".join(tags) + "|",
                holder=f"bench:{i}" if status == "claimed" else "",
                holder_host="bench-host" if status == "claimed" else "",
                holder_pid=10_000 + i if status == "claimed" else None,
                lease_expires_at=now + timedelta(minutes=5) if status == "claimed" else None,
                created_at=now - timedelta(seconds=count - i),
                updated_at=now - timedelta(seconds=count - i),
            )
        )
        if len(batch) == 5000:
            _insert(batch, rng)
            batch = []
    _insert(batch, rng)


def _insert(batch: list, rng: random.Random) -> None:
    from workqueue.models import Task, TaskBody

    Task.objects.bulk_create(batch)  # sets the pks on SQLite and PostgreSQL
    bodies = []
    for task in batch:
        words = rng.choices(VOCABULARY, k=40)
        if rng.random() < 0.005:
            words[rng.randrange(39)] = "webhook retry"
        bodies.append(TaskBody(task_id=task.pk, text=f"# {task.title}\n\n" + " ".join(words)))
    TaskBody.objects.bulk_create(bodies)


def _median_ms(call, repeat: int) -> float:
    call()  # warm caches: templates, statements, pages
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def _version(response) -> str:
    """The version the board's live refresh sends back as `since`."""
    return re.search(r'data-version="([^"]+)"', response.content.decode()).group(1)


def _sql_ms(call) -> float:
    from django.db import connection

    spent = []

    def timed(execute, sql, params, many, context):
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            spent.append(time.perf_counter() - start)

    with connection.execute_wrapper(timed):
        call()
    return round(sum(spent) * 1000, 2)


def _text_counts(repeat: int) -> dict:
    """The columns' counts for each text filter: the old icontains on title and key (no
    body, a scan) against the search index on title, key and body."""
    from django.db.models import Q

    from workqueue.models import Task

    found = {}
    for name, filters in FILTERS.items():
        if list(filters) != ["q"]:
            continue
        text = filters["q"]
        old = Task.objects.filter(Q(title__icontains=text) | Q(key__icontains=text))
        found[name] = {
            "old_icontains": _median_ms(lambda o=old: o.counts(), repeat),
            "search_index": _median_ms(
                lambda t=text: Task.objects.matching_text(t).counts(), repeat
            ),
        }
    return found


def _forget_kept_searches() -> None:
    from django.db import connection

    from workqueue import search_hits

    if connection.vendor == "postgresql":
        search_hits.forget_kept(connection)


def _measure(repeat: int) -> dict:
    from django.contrib.auth import get_user_model
    from django.core.cache import cache
    from django.test import Client

    user = get_user_model().objects.create_superuser("bench", "", "bench-password")
    client = Client()
    client.force_login(user)
    first = client.get("/")
    assert first.status_code == 200, first.status_code
    version = _version(first)

    def render(filters=None):
        response = client.get("/", filters or {})
        assert response.status_code == 200

    def refresh():
        nonlocal version
        response = client.get("/", {"since": version})
        if response.status_code == 200:
            # The version's clock bucket turned over: one render, then 204s again.
            version = _version(response)
        else:
            assert response.status_code == 204, response.status_code

    def dropdowns(filters=None):
        response = client.get("/filters/", filters or {})
        assert response.status_code == 200

    def first_render(filters=None):
        # The first render after a change: the view's version is worked out again (later
        # renders find it in the cache) and the board is sent without its dropdowns. A
        # search PostgreSQL kept in the database is gone too, as after a change of text.
        cache.clear()
        _forget_kept_searches()
        render(filters)

    def after_first_render(call, filters=None, shown=None) -> float:
        # `call` once the board of `shown` (of `filters` unless given) after a change and
        # its dropdowns are shown, as the page fetches them.
        times = []
        for _ in range(max(3, repeat // 3)):
            first_render(filters if shown is None else shown)
            if shown is not None:
                dropdowns(shown)
            start = time.perf_counter()
            call(filters)
            times.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(times), 2)

    from django.utils import timezone

    from workqueue.models import Task

    moved = Task.objects.filter(status="queued").order_by("id").values_list("id", flat=True)[0]

    def after_a_claim(filters) -> float:
        # The first render after a change of status alone, what a running herd makes all
        # day: the view is counted again; a text's search is kept where the database tells
        # that no text changed (SQLite). first_render clears every cache, as a change of
        # text does.
        times = []
        for turn in range(max(3, repeat // 3)):
            status = "claimed" if turn % 2 == 0 else "queued"
            Task.objects.filter(pk=moved).update(status=status, updated_at=timezone.now())
            start = time.perf_counter()
            render(filters)
            times.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(times), 2)

    def from_board(filters) -> float:
        # A person picks a filter on the board they opened after a change: those of the
        # fields left unfiltered are kept from its dropdowns.
        return after_first_render(render, filters, shown={})

    filtered, cold, cold_dropdowns, chosen, sql, matches = {}, {}, {}, {}, {}, {}
    claimed = {}
    for name, filters in FILTERS.items():
        filtered[name] = _median_ms(lambda f=filters: render(f), repeat)
        cold[name] = _median_ms(lambda f=filters: first_render(f), max(3, repeat // 3))
        claimed[name] = after_a_claim(filters)
        cold_dropdowns[name] = after_first_render(dropdowns, filters)
        chosen[name] = from_board(filters)
        sql[name] = _sql_ms(lambda f=filters: render(f))
        matches[name] = int(client.get("/", filters).context["total"])
    return {
        "render_ms": _median_ms(render, repeat),
        "text_counts_ms": _text_counts(repeat),
        "refresh_ms": _median_ms(refresh, repeat * 3),
        "filtered_ms": max(filtered.values()),
        "filtered_render_ms": filtered,
        "first_render_ms": _median_ms(first_render, max(3, repeat // 3)),
        "first_dropdowns_ms": after_first_render(dropdowns),
        "filtered_first_render_ms": cold,
        "filtered_after_a_claim_ms": claimed,
        # The dropdowns' counts the page fetches once that board is shown.
        "filtered_first_dropdowns_ms": cold_dropdowns,
        "filtered_from_board_ms": chosen,
        # Of one render, the time spent in the database (the rest is templates).
        "filtered_sql_ms": sql,
        "filtered_matches": matches,
        "page_bytes": len(first.content),
    }


def run(tasks: int = 100_000, repeat: int = 9) -> dict:
    _setup_django()
    from django.db import connection
    from django.test.utils import setup_test_environment, teardown_test_environment

    settings_dict = connection.settings_dict
    settings_dict.setdefault("TEST", {})
    if connection.vendor == "sqlite":
        from django.conf import settings

        settings_dict["TEST"]["NAME"] = str(settings.HYPERVISOR_DATA_DIR / "bench-board.sqlite3")
    else:
        settings_dict["TEST"]["NAME"] = f"{settings_dict['NAME']}_bench_board"
    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        start = time.perf_counter()
        _fill(tasks)
        fill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if connection.vendor == "postgresql":
            # What autovacuum does to a table soon after a bulk load: statistics, and the
            # visibility map that lets a count read the index alone.
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE queue_task")
        else:
            # What an import of this many tasks does before it returns.
            from workqueue.models import Task

            Task.objects.keep_statistics()
        statistics_seconds = time.perf_counter() - start
        result = {
            "database": connection.vendor,
            "tasks": tasks,
            "fill_seconds": round(fill_seconds, 1),
            "statistics_seconds": round(statistics_seconds, 2),
            **_measure(repeat),
        }
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        teardown_test_environment()
    result["targets"] = TARGETS
    result["meets_targets"] = all(result[name] < limit for name, limit in TARGETS.items())
    return result


if __name__ == "__main__":
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(json.dumps(run(tasks), indent=2))
