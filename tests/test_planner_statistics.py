"""SQLite's planner statistics for the task table: measured after a large import and
when the table's size drifts, so a board filtered by several fields walks the most
selective field's index. PostgreSQL's autovacuum keeps its own."""

from __future__ import annotations

import random
import re

import pytest
from django.core.cache import cache
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from tests.conftest import make_tasks
from workqueue import importer, models
from workqueue.importer import Importer
from workqueue.models import Status, Task
from workqueue.tasks import keep_planner_statistics

sqlite_only = pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's statistics")


def measured_rows() -> int | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")
        if not cursor.fetchone():
            return None
        cursor.execute(
            "SELECT MAX(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = 'queue_task'"
        )
        return cursor.fetchone()[0]


def plan(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN QUERY PLAN " + sql)
        return "\n".join(row[-1] for row in cursor.fetchall())


def tasks_like_a_busy_inbox(count: int, start: int = 0) -> None:
    """Projects are the rarest value (one in twenty), complexity the commonest (one in
    four): the board should start from the project's index."""
    rng = random.Random(start)
    tasks = make_tasks("inbox", count)
    for i, task in enumerate(tasks, start):
        task.key = f"inbox-{i:06d}"
        task.project = f"project-{rng.randrange(20)}"
        task.assignee = rng.choice(("", "ann", "bo", "bot"))
        task.complexity = rng.choice(("", "small", "medium", "large"))
        task.status = Status.DONE if rng.random() < 0.8 else Status.QUEUED
        task.tags = sorted(rng.sample(("auth", "bug", "docs", "ui"), 2))
        task.tag_index = "|" + "|".join(task.tags) + "|"
    Task.objects.bulk_update(
        tasks, ["key", "project", "assignee", "complexity", "status", "tags", "tag_index"]
    )


@sqlite_only
@pytest.mark.django_db
def test_a_board_filtered_by_fields_counts_from_the_rarest_fields_index_alone(admin_client):
    tasks_like_a_busy_inbox(2000)
    assert Task.objects.keep_statistics()
    filters = {"project": "project-3", "assignee": "ann", "complexity": "large"}
    with CaptureQueriesContext(connection) as statements:
        response = admin_client.get("/", filters)
        assert admin_client.get("/filters/", filters).status_code == 200  # the dropdowns
    assert response.status_code == 200
    expected = Task.objects.filter(**filters).count()
    assert expected > 0
    assert response.context["total"] == expected, "counts stay exact"
    # TaskQuerySet.counts_and_stamp: a count per status, each named by its status.
    counting = [q["sql"] for q in statements.captured_queries if 'AS "queued"' in q["sql"]]
    assert counting, "the board counts its columns"
    for sql in counting:
        assert "USING COVERING INDEX task_board_project (project=?)" in plan(sql), plan(sql)
    # The view's version and the dropdowns' counts too read a range of an index, not a row
    # per task, nor a whole index.
    every_count = [q["sql"] for q in statements.captured_queries if "COUNT(" in q["sql"]]
    assert len(every_count) > len(counting)
    for sql in every_count:
        assert "SEARCH queue_task USING COVERING INDEX" in plan(sql), (sql, plan(sql))


@sqlite_only
@pytest.mark.django_db
def test_the_tag_dropdown_walks_the_tags_index_in_order_unless_another_filter_narrows(
    admin_client,
):
    tasks_like_a_busy_inbox(2000)
    assert Task.objects.keep_statistics()
    for filters, expected in (
        # Alone: the index of the tags in order, neither a sort nor a row read per task.
        ({}, "SCAN queue_task USING COVERING INDEX task_tags"),
        # With a tag filter the tag dropdown is the unfiltered board's.
        ({"tag": "ui"}, "SCAN queue_task USING COVERING INDEX task_tags"),
        # Narrowed: the filter's own range and a sort, not the tags' index with a row
        # read per task to check the filter.
        ({"complexity": "large"}, "SEARCH queue_task USING COVERING INDEX task_board_complexity"),
    ):
        cache.clear()  # each dropdown is counted, not found kept from the case before
        with CaptureQueriesContext(connection) as statements:
            response = admin_client.get("/filters/", filters)
        assert response.status_code == 200
        (sql,) = [q["sql"] for q in statements.captured_queries if 'AS "combination"' in q["sql"]]
        assert plan(sql).startswith(expected), plan(sql)
        assert ("TEMP B-TREE" in plan(sql)) == ("complexity" in filters), plan(sql)
        (tags,) = re.findall(r'<select name="tag">(.*?)</select>', response.text, re.S)
        offered = re.findall(r'<option value="(\w+)"[^>]*>\1 \(([\d,]+)\)', tags)
        shown = {tag: int(n.replace(",", "")) for tag, n in offered}
        tasks = Task.objects.filter(complexity=filters.get("complexity", F("complexity")))
        assert shown == {t: tasks.filter(tag_index__contains=f"|{t}|").count() for t in shown}
        assert set(shown) == {"auth", "bug", "docs", "ui"}
    # Claims and finishes never write that index: it holds none of their fields.
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pragma_index_info('task_tags')")
        assert cursor.fetchall() == [("tag_index",)]


@sqlite_only
@pytest.mark.django_db
def test_statistics_are_measured_again_only_when_the_table_drifts():
    tasks_like_a_busy_inbox(models.STATISTICS_FLOOR // 2)
    assert not Task.objects.keep_statistics(), "too few tasks for plans to matter"
    assert measured_rows() is None

    tasks_like_a_busy_inbox(1500, start=500)  # 2,000 in all
    assert Task.objects.keep_statistics()
    assert measured_rows() == 2000
    assert not Task.objects.keep_statistics(), "nothing moved"

    tasks_like_a_busy_inbox(400, start=2000)  # 2,400: less than a quarter more
    assert not Task.objects.keep_statistics()
    assert measured_rows() == 2000

    tasks_like_a_busy_inbox(200, start=2400)  # 2,600
    keep_planner_statistics.call_local()  # what the consumer runs every ten minutes
    assert measured_rows() == 2600

    Task.objects.filter(pk__in=Task.objects.values("pk")[:1000]).delete()  # 1,600
    assert Task.objects.keep_statistics(), "a table that shrank is measured again"
    assert measured_rows() == 1600


@sqlite_only
@pytest.mark.django_db
def test_a_large_import_measures_the_table_before_it_returns(tmp_path, monkeypatch, settings):
    monkeypatch.setattr(models, "STATISTICS_FLOOR", 50)
    monkeypatch.setattr(importer, "STATISTICS_AFTER", 40)
    folder = tmp_path / "inbox"
    folder.mkdir()
    settings.HYPERVISOR_IMPORT_ROOTS = [str(tmp_path)]
    for i in range(30):
        (folder / f"task-{i}.md").write_text(f"---\ntitle: Task {i}\n---\nBody {i}\n")
    Importer("inbox").run([folder])
    assert measured_rows() is None, "a small import leaves it to the periodic check"

    for i in range(30, 90):
        (folder / f"task-{i}.md").write_text(f"---\ntitle: Task {i}\n---\nBody {i}\n")
    report = Importer("inbox").run([folder])
    assert report.imported == 60
    assert measured_rows() == 90


@sqlite_only
@pytest.mark.django_db
def test_claims_keep_their_queue_index_when_statistics_exist():
    tasks_like_a_busy_inbox(2000)
    assert Task.objects.keep_statistics()
    ready = Task.objects.filter(queue="inbox").ready().claim_order().values_list("id")[:8]
    sql, params = ready.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN QUERY PLAN " + sql, params)
        steps = [row[-1] for row in cursor.fetchall()]
    assert any(s.startswith("SEARCH queue_task USING") and "queue=?" in s for s in steps), steps


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's autovacuum")
@pytest.mark.django_db
def test_postgresql_is_left_to_its_autovacuum():
    tasks_like_a_busy_inbox(2000)
    assert not Task.objects.keep_statistics()


@pytest.mark.django_db
def test_each_fields_index_holds_only_the_tasks_with_a_value_and_serves_its_filter(
    admin_client,
):
    """A claim and a finish move a task's entry in every index holding its status: the
    index of a field the task leaves empty holds no entry for it (no filter asks for an
    empty value), and a board filtered by the field still counts from that index."""
    tasks_like_a_busy_inbox(2000)
    Task.objects.keep_statistics()
    with connection.cursor() as cursor:
        for field in ("project", "assignee", "complexity", "type"):
            if connection.vendor == "sqlite":
                cursor.execute(
                    "SELECT sql FROM sqlite_master WHERE name = %s", [f"task_board_{field}"]
                )
                assert cursor.fetchone()[0].endswith(f"WHERE NOT (\"{field}\" = '')")
            else:
                cursor.execute(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                    [f"task_board_{field}"],
                )
                assert cursor.fetchone()[0].endswith(f"WHERE (NOT (({field})::text = ''::text))")
    for field, value in (("project", "project-3"), ("assignee", "ann"), ("complexity", "large")):
        with CaptureQueriesContext(connection) as statements:
            response = admin_client.get("/", {field: value})
        assert response.context["total"] == Task.objects.filter(**{field: value}).count() > 0
        if connection.vendor == "sqlite":
            (sql,) = [q["sql"] for q in statements.captured_queries if 'AS "queued"' in q["sql"]]
            assert f"COVERING INDEX task_board_{field} ({field}=?" in plan(sql), plan(sql)
