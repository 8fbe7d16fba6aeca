"""Herd pages, admin and profile validation: login, permissions, CSRF, never a command line."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from herds.admin import PROTECTED_NAMED, WORKERS_INLINE
from herds.models import Herd, HerdStatus, HerdWorker, LaunchRepeated, Profile
from herds.supervision import worker_argv
from tests.conftest import make_tasks, run_manage
from workqueue import cpu_slots
from workqueue.models import Status, Task

pytestmark = pytest.mark.django_db


def user_with(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw-for-tests")
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def profile() -> Profile:
    return Profile.objects.update_or_create(
        name="noop", defaults={"processor": "noop", "max_workers": 8}
    )[0]


@pytest.fixture
def herd(profile) -> Herd:
    return Herd.objects.create(queue="inbox", profile=profile, size=2, status=HerdStatus.RUNNING)


@pytest.fixture
def viewer() -> User:
    return user_with("viewer", "view_herd")


@pytest.fixture
def operator() -> User:
    return user_with("operator", "view_herd", "add_herd")


def client_for(user: User | None, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    if user is not None:
        client.force_login(user)
    return client


def read_urls(herd: Herd) -> list[str]:
    return [
        reverse("herds:list"),
        reverse("herds:detail", args=[herd.pk]),
        reverse("herds:live", args=[herd.pk]),
    ]


def test_every_herd_page_needs_a_login(herd):
    pages = [*read_urls(herd), reverse("herds:summary_json", args=[herd.pk])]
    pages.append(reverse("herds:launch"))
    actions = [reverse("herds:drain", args=[herd.pk]), reverse("herds:cancel", args=[herd.pk])]
    anonymous = Client()
    responses = [(url, anonymous.get(url)) for url in pages]
    responses += [(url, anonymous.post(url)) for url in actions]
    for url, response in responses:
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url
    herd.refresh_from_db()
    assert not herd.draining and not herd.cancel_requested


def test_viewing_needs_view_permission(herd, viewer):
    nobody = client_for(user_with("nobody"))
    allowed = client_for(viewer)
    for url in read_urls(herd):
        assert nobody.get(url).status_code == 403, url
        assert allowed.get(url).status_code == 200, url


def test_launching_draining_cancelling_need_add_herd(herd, viewer):
    client = client_for(viewer)
    assert client.get(reverse("herds:launch")).status_code == 403
    assert client.post(reverse("herds:drain", args=[herd.pk])).status_code == 403
    assert client.post(reverse("herds:cancel", args=[herd.pk])).status_code == 403
    herd.refresh_from_db()
    assert not herd.draining and not herd.cancel_requested
    # Launching without seeing: each action answers with the herd's page it cannot see.
    blind = client_for(user_with("blind", "add_herd"))
    assert blind.get(reverse("herds:launch")).status_code == 403
    assert blind.post(reverse("herds:drain", args=[herd.pk])).status_code == 403
    herd.refresh_from_db()
    assert not herd.draining


def test_the_list_shows_the_newest_herds(herd, viewer, profile):
    Herd.objects.bulk_create(
        Herd(queue="q", profile=profile, size=1, status=HerdStatus.FINISHED) for _ in range(100)
    )
    newest = Herd.objects.create(queue="q", profile=profile, size=1)
    page = client_for(viewer).get(reverse("herds:list")).content.decode()
    assert reverse("herds:detail", args=[newest.pk]) in page
    assert reverse("herds:detail", args=[herd.pk]) not in page  # the oldest, past 100


def test_actions_are_post_only(herd, operator):
    client = client_for(operator)
    assert client.get(reverse("herds:drain", args=[herd.pk])).status_code == 405
    assert client.get(reverse("herds:cancel", args=[herd.pk])).status_code == 405


@pytest.mark.parametrize("action", ["drain", "cancel"])
def test_actions_refuse_a_post_without_csrf_token(herd, operator, action):
    client = client_for(operator, csrf=True)
    url = reverse(f"herds:{action}", args=[herd.pk])
    assert client.post(url).status_code == 403
    herd.refresh_from_db()
    assert not herd.draining and not herd.cancel_requested


def test_launch_form_refuses_a_post_without_csrf_token(operator, profile):
    client = client_for(operator, csrf=True)
    response = client.post(
        reverse("herds:launch"), {"queue": "inbox", "profile": "noop", "workers": 2, "batch": 0}
    )
    assert response.status_code == 403
    assert not Herd.objects.exists()


def test_drain_with_token_marks_the_herd_and_its_workers(herd, operator):
    client = client_for(operator, csrf=True)
    client.get(reverse("herds:detail", args=[herd.pk]))
    token = client.cookies["csrftoken"].value
    worker = herd.workers.create(index=0, name="w0", host="h")
    response = client.post(reverse("herds:drain", args=[herd.pk]), HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 302
    herd.refresh_from_db()
    worker.refresh_from_db()
    assert herd.draining and "drained by operator" in herd.reason
    assert worker.drain_reason == herd.reason


def test_a_drained_workers_row_says_it_stopped_claiming_not_that_work_ran_out(herd, viewer):
    drained, finished = (herd.workers.create(index=i, name=f"w{i}", host="h") for i in (0, 1))
    finished.record_exit(0, *finished.classify_exit(0))  # out of work before the drain
    herd.drain("drained by operator")
    drained.refresh_from_db()
    drained.record_exit(0, *drained.classify_exit(0))
    page = client_for(viewer).get(reverse("herds:live", args=[herd.pk])).content.decode()
    assert "Exited: finished its tasks, then stopped claiming (drained)" in page
    assert "drained by operator" in page
    assert page.count("Exited: finished (no more work or batch reached)") == 1


def test_cancel_requests_supervision_and_enqueues_after_commit(
    herd, operator, django_capture_on_commit_callbacks
):
    client = client_for(operator)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(reverse("herds:cancel", args=[herd.pk]), HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="herd-live"' in page
    # Said at once, beside the section (the page's notice), and not again elsewhere.
    notice = '<div id="herd-notice" role="status" hx-swap-oob="true"><ul class="messages">'
    assert f"{notice}<li>Herd {herd.pk} is being cancelled.</li>" in page
    assert "being cancelled" not in client.get(reverse("board")).content.decode()
    herd.refresh_from_db()
    assert herd.cancel_requested and herd.draining
    assert len(callbacks) == 1
    # It is cancelling, not draining, until it ends.
    detail = client.get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "Running (cancelling)</span>" in detail and "(draining)" not in detail


def test_cancelling_a_pending_herd_ends_it_at_once(profile, operator):
    pending = Herd.objects.create(queue="inbox", profile=profile, size=2)
    client_for(operator).post(reverse("herds:cancel", args=[pending.pk]))
    pending.refresh_from_db()
    assert pending.status == HerdStatus.CANCELLED
    assert pending.summary["status"] == "cancelled"


def test_launch_shows_preflight_then_starts_on_confirm(
    operator, profile, django_capture_on_commit_callbacks
):
    make_tasks("inbox", 5)
    Task.objects.filter(key="t000000").update(status=Status.DONE)
    client = client_for(operator)
    form = {"queue": "inbox", "profile": "noop", "workers": 3, "batch": 0, "where": ""}

    preflight = client.post(reverse("herds:launch"), form)
    assert preflight.status_code == 200
    text = preflight.content.decode()
    assert "4 ready, 1 skipped (already complete), 0 waiting on dependencies, 0 locks held" in text
    assert not Herd.objects.exists()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        started = client.post(reverse("herds:launch"), {**form, "confirm": "1"})
    herd = Herd.objects.get()
    assert started.status_code == 302
    assert started["Location"] == reverse("herds:detail", args=[herd.pk])
    assert (herd.queue, herd.profile, herd.size, herd.created_by) == (
        "inbox",
        profile,
        3,
        operator,
    )
    assert len(callbacks) == 1


def launch_token_in(page: str) -> str:
    found = re.search(r'name="launch_token" value="([^"]+)"', page)
    assert found, "the launch form carries its one-time launch token"
    return found.group(1)


def test_a_launch_form_sent_twice_launches_one_herd(
    operator, profile, django_capture_on_commit_callbacks
):
    """A double-click on Start (or a browser's retry) sends the same form twice: the
    second is taken to the first herd, not launched as a second herd on the same queue."""
    make_tasks("inbox", 5)
    client = client_for(operator)
    form = {"queue": "inbox", "profile": "noop", "workers": 3, "batch": 0, "where": ""}
    token = launch_token_in(client.get(reverse("herds:launch")).content.decode())
    preflight = client.post(reverse("herds:launch"), {**form, "launch_token": token})
    assert launch_token_in(preflight.content.decode()) == token

    sent = {**form, "launch_token": token, "confirm": "1"}
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        first = client.post(reverse("herds:launch"), sent)
        second = client.post(reverse("herds:launch"), sent, follow=True)
    herd = Herd.objects.get()
    assert len(callbacks) == 1, "one launch enqueued"
    assert first["Location"] == second.redirect_chain[0][0] == herd.get_absolute_url()
    text = second.content.decode()
    assert f"Herd {herd.pk} was launched from this form already" in text
    # A fresh form is a new launch.
    again = launch_token_in(client.get(reverse("herds:launch")).content.decode())
    assert again != token
    with django_capture_on_commit_callbacks(execute=False):
        client.post(reverse("herds:launch"), {**sent, "launch_token": again})
    assert Herd.objects.count() == 2


def test_a_launch_token_is_taken_once_even_by_two_launches_at_once(profile):
    """The second of two launches racing with one token finds the first herd (a unique
    column decides, not a look before the insert)."""
    make_tasks("inbox", 2)
    first = Herd.launch("inbox", profile, 1, launch_token="t" * 22)
    with pytest.raises(LaunchRepeated) as repeat:
        Herd.launch("inbox", profile, 2, launch_token="t" * 22)
    assert repeat.value.herd == first
    assert Herd.objects.count() == 1


def test_preflight_counts_respect_profile_and_form_filters(operator):
    Profile.objects.create(name="mechanical", processor="noop", filters=["complexity=mechanical"])
    make_tasks("inbox", 5, complexity="mechanical", project="web")
    Task.objects.filter(key__in=["t000003", "t000004"]).update(complexity="multi-step")
    Task.objects.filter(key="t000002").update(project="api")
    form = {"queue": "inbox", "profile": "mechanical", "workers": 2, "batch": 0}

    page = client_for(operator).post(reverse("herds:launch"), {**form, "where": "project=web"})

    text = page.content.decode()
    assert "2 ready for this profile and its filters, 3 others ready but filtered out" in text
    assert "complexity=mechanical, project=web" in text
    assert "5 ready, 0 skipped (already complete)" in text
    # The herd's own page says which figures are its filters' and which the queue's (it
    # put 2 ready beside the queue's waiting tasks as if both were the view's).
    herd = Herd.objects.create(
        queue="inbox",
        profile=Profile.objects.get(name="mechanical"),
        size=2,
        filters=["project=web"],
    )
    herd.record_preflight()
    line = client_for(operator).get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert (
        "Pre-flight: 2 ready for its filters (complexity=mechanical, project=web; 3 others "
        "ready but filtered out); in the whole queue 0 skipped (already complete), 0 waiting "
        "on dependencies, 0 locks held"
    ) in line


def test_launch_form_refuses_a_malformed_filter(operator, profile):
    page = client_for(operator).post(
        reverse("herds:launch"),
        {"queue": "inbox", "profile": "noop", "workers": 1, "batch": 0, "where": "colour=red"},
    )
    assert page.status_code == 400
    assert "unknown field" in page.content.decode()


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        # A value longer than its column can never match (a 100,000-character project
        # made a herd whose page was 900,000 px wide).
        ("project=" + "x" * 100_000, "project: 100,000 characters, longer than any task"),
        ("complexity=" + "x" * 101, "complexity: 101 characters"),
        ("tag=" + "x" * 201, "tag: 201 characters"),
        ("assignee!=" + "x" * 201, "assignee: 201 characters"),
        ("priority<=" + "9" * 5000, "priority: past any task&#x27;s priority"),
        ("priority>=-2147483649", "priority: past any task&#x27;s priority"),
    ],
)
def test_launch_form_refuses_a_filter_no_task_can_match(operator, profile, where, problem):
    make_tasks("inbox", 1)
    form = {"queue": "inbox", "profile": "noop", "workers": 1, "batch": 0, "where": where}
    page = client_for(operator).post(reverse("herds:launch"), form)
    assert page.status_code == 400
    assert problem in page.content.decode()
    ok = {**form, "where": f"project={'x' * 200} priority>=-2147483648"}
    assert client_for(operator).post(reverse("herds:launch"), ok).status_code == 200


@pytest.mark.parametrize(("field", "value"), [("batch", "9" * 23), ("workers", "9" * 23)])
def test_preflight_refuses_a_number_start_would_refuse(operator, profile, field, value):
    """batch=99999999999999999999999 passed the pre-flight and was refused only at Start."""
    make_tasks("inbox", 1)
    form = {"queue": "inbox", "profile": "noop", "workers": 1, "batch": 0, field: value}
    page = client_for(operator).post(reverse("herds:launch"), form)
    assert page.status_code == 400
    assert "less than or equal to" in page.content.decode()  # not a pre-flight (200)


@pytest.mark.parametrize(
    ("field", "value"), [("wall_clock_limit", "99999999999999"), ("token_budget", 10**16)]
)
def test_launch_form_refuses_a_limit_past_any_herd(operator, profile, field, value):
    """A wall clock of 10**14 s was taken; supervision then failed on its herd for ever."""
    make_tasks("inbox", 1)
    form = {"queue": "inbox", "profile": "noop", "workers": 1, "batch": 0, "confirm": "1"}
    page = client_for(operator).post(reverse("herds:launch"), {**form, field: value})
    assert page.status_code == 400
    assert "less than or equal to" in page.content.decode()
    assert not Herd.objects.exists()


def test_launch_form_takes_a_profile_never_a_command(operator, profile):
    make_tasks("inbox", 1)
    client = client_for(operator)
    form = {"queue": "inbox", "profile": "noop", "workers": 9, "batch": 0, "confirm": "1"}
    too_many = client.post(reverse("herds:launch"), {**form, "command": "rm -rf /"})
    assert too_many.status_code == 400
    assert "at most 8 workers" in too_many.content.decode()
    unknown = client.post(reverse("herds:launch"), {**form, "workers": 1, "profile": "sh -c x"})
    assert unknown.status_code == 400
    assert not Herd.objects.exists()


def test_live_fragment_polls_until_the_herd_ends(herd, viewer):
    client = client_for(viewer)
    url = reverse("herds:live", args=[herd.pk])
    assert 'hx-trigger="every 2s"' in client.get(url, HTTP_HX_REQUEST="true").content.decode()
    herd.finish(HerdStatus.FINISHED)
    ended = client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "hx-trigger" not in ended
    assert "Run summary" in ended


def test_summary_downloads_as_json_once_written(herd, viewer):
    client = client_for(viewer)
    url = reverse("herds:summary_json", args=[herd.pk])
    assert client.get(url).status_code == 409
    herd.finish(HerdStatus.FINISHED)
    response = client.get(url)
    assert response.status_code == 200
    assert "attachment" in response["Content-Disposition"]
    data = json.loads(response.content)
    assert data["herd"] == herd.pk and data["status"] == "finished"


def test_chart_is_server_rendered_svg(herd, viewer):
    Herd.objects.filter(pk=herd.pk).update(samples=[[0, 0], [1.0, 10], [2.0, 30]])
    page = client_for(viewer).get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "<svg" in page and "<polyline" in page


def test_herd_list_shows_past_herds(herd, viewer):
    herd.finish(HerdStatus.FINISHED, "all done")
    page = client_for(viewer).get(reverse("herds:list")).content.decode()
    assert f"#{herd.pk}" in page and "Finished" in page


def test_herd_list_pages_back_to_the_oldest_herd(profile, viewer, monkeypatch):
    # The newest hundred were all it showed: older herds were out of reach but for the admin.
    monkeypatch.setattr("herds.views.LISTED", 2)
    first, second, third = (
        Herd.objects.create(queue="inbox", profile=profile, size=1) for _ in range(3)
    )
    client = client_for(viewer)
    newest = client.get(reverse("herds:list")).content.decode()
    assert (
        f"#{third.pk}<" in newest and f"#{second.pk}<" in newest and f"#{first.pk}<" not in newest
    )
    assert f'href="?before={second.pk}"' in newest
    older = client.get(reverse("herds:list"), {"before": second.pk}).content.decode()
    assert f"#{first.pk}<" in older and f"#{second.pk}<" not in older
    assert "?before=" not in older
    assert client.get(reverse("herds:list"), {"before": "x"}).status_code == 200


def test_herd_list_reads_two_figures_of_each_summary_not_the_summaries(herd, viewer):
    """A summary holds a row per task: the list parsed a hundred past herds' whole
    summaries (3 s at 20,000 tasks each) to show two figures."""
    herd.finish(HerdStatus.FINISHED, "all done")
    rows = [{"key": f"t{n}", "status": "done"} for n in range(2000)]
    Herd.objects.filter(pk=herd.pk).update(
        summary={"items_per_second": 12.5, "runtime_seconds": 80.44, "tasks": rows}
    )
    with CaptureQueriesContext(connection) as queries:
        page = client_for(viewer).get(reverse("herds:list")).content.decode()
    listed = next(q["sql"] for q in queries.captured_queries if '"herds_herd"."size"' in q["sql"])
    assert '"herds_herd"."summary"' not in listed.partition("(SELECT")[0]
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert "12.5" in cells and "80.4 s" in cells


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"processor": "command", "command": "echo hi"}, "command"),
        ({"processor": "command", "command": []}, "command"),
        ({"processor": "command", "command": ["agent", 3]}, "command"),
        ({"processor": "noop", "command": ["agent"]}, "command"),
        ({"quota_pattern": "(unclosed"}, "quota_pattern"),
        ({"env": {"A": 1}}, "env"),
        ({"filters": ["complexity"]}, "filters"),
    ],
)
def test_profile_save_refuses_invalid_settings(fields, field):
    with pytest.raises(ValidationError) as caught:
        Profile(name="bad", **fields).save()
    assert field in caught.value.message_dict
    assert not Profile.objects.filter(name="bad").exists()


def test_a_bad_quota_pattern_is_said_once_in_the_admin():
    """The field's validator and the profile's own check both said it."""
    with pytest.raises(ValidationError) as caught:
        Profile(name="bad", quota_pattern="(unclosed").full_clean()
    said = caught.value.message_dict["quota_pattern"]
    assert len(said) == 1 and said[0].startswith("Not a regular expression: missing )")


def test_a_herd_worker_is_started_with_its_profile_and_the_herd_filters(profile):
    plain = Herd.objects.create(queue="inbox", profile=profile, size=1)
    worker = plain.workers.create(index=0, name="w0", host="h")
    argv = worker_argv(plain, worker)
    assert f"--profile={profile.name}" in argv and not [a for a in argv if "--where" in a]

    agent = Profile.objects.create(
        name="agent",
        processor="command",
        command=["{python}", "agent.py", "{path}"],
        filters=["complexity=mechanical"],
        worktree_repo="/srv/repo",
        require_commit=True,
    )
    routed = Herd.objects.create(queue="inbox", profile=agent, size=1, filters=["project=web"])
    argv = worker_argv(routed, worker)
    # The worker reads the profile (command, routing, worktree) itself: none of it here,
    # so no command line and no profile secret ever reaches a process listing.
    assert "--profile=agent" in argv
    assert [a for a in argv if a.startswith("--where")] == ["--where=project=web"]
    assert not [a for a in argv if a == "--" or "agent.py" in a or "worktree" in a]


def test_default_profiles_come_from_the_data_migration():
    names = set(Profile.objects.values_list("name", flat=True))
    assert {"noop", "example-agent"} <= names
    agent = Profile.objects.get(name="example-agent")
    assert agent.command[0] == "{python}" and "{path}" in agent.command


def test_admin_lists_herds_read_only_and_drains_by_action(herd):
    admin = User.objects.create_superuser("admin", password="pw-for-tests")
    client = client_for(admin)
    changelist = reverse("admin:herds_herd_changelist")
    assert client.get(changelist).status_code == 200
    assert client.get(reverse("admin:herds_herd_add")).status_code == 403
    response = client.post(
        changelist, {"action": "drain_herds", "_selected_action": [herd.pk]}, follow=True
    )
    assert response.status_code == 200
    herd.refresh_from_db()
    assert herd.draining


def test_the_admins_herd_page_links_many_workers_and_the_summary_instead_of_listing_them(
    herd,
):
    admin = User.objects.create_superuser("admin", password="pw-for-tests")
    client = client_for(admin)
    HerdWorker.objects.bulk_create(
        HerdWorker(herd=herd, index=i, name=f"w-{i}", host="h") for i in range(WORKERS_INLINE + 1)
    )
    rows = [{"task_id": f"row-{i}", "status": "success"} for i in range(300)]
    Herd.objects.filter(pk=herd.pk).update(summary={"done": 300, "blocked": 0, "workers": rows})
    page = client.get(reverse("admin:herds_herd_change", args=[herd.pk])).content.decode()
    assert "row-299" not in page and "w-50" not in page  # neither listed in full
    assert reverse("herds:summary_json", args=[herd.pk]) in page
    workers = reverse("admin:herds_herdworker_changelist") + f"?herd__id__exact={herd.pk}"
    assert workers in page
    listed = client.get(workers).content.decode()
    assert "w-50" in listed and f"{WORKERS_INLINE + 1} herd workers" in listed
    # A herd of a few workers still shows them on its page.
    few = Herd.objects.create(queue="inbox", profile=herd.profile, size=1)
    HerdWorker.objects.create(herd=few, index=0, name="only-one", host="h")
    assert "only-one" in client.get(reverse("admin:herds_herd_change", args=[few.pk])).text


def test_a_profile_many_herds_ran_with_is_kept_and_its_delete_page_counts_them(profile):
    admin = User.objects.create_superuser("admin", password="pw-for-tests")
    client = client_for(admin)
    Herd.objects.bulk_create(
        Herd(queue=f"queue-{i}", profile=profile, size=1) for i in range(PROTECTED_NAMED + 2)
    )
    url = reverse("admin:herds_profile_delete", args=[profile.pk])
    page = client.get(url).content.decode()
    assert "and 2 more herds" in page
    assert page.count("Herd: herd ") == PROTECTED_NAMED
    assert client.post(url, {"post": "yes"}).status_code == 200
    assert Profile.objects.filter(pk=profile.pk).exists()
    unused = Profile.objects.create(name="unused", processor="noop")
    client.post(reverse("admin:herds_profile_delete", args=[unused.pk]), {"post": "yes"})
    assert not Profile.objects.filter(pk=unused.pk).exists()


def test_admin_profile_form_shows_validation_errors():
    admin = User.objects.create_superuser("admin", password="pw-for-tests")
    response = client_for(admin).post(
        reverse("admin:herds_profile_add"),
        {
            "name": "shell",
            "processor": "command",
            "command": '"bash -c ls"',
            "env": "{}",
            "filters": "[]",
            "prefetch": 1,
            "max_workers": 2,
            "worktree_base": "main",
        },
    )
    assert response.status_code == 200
    assert "non-empty list of strings" in response.content.decode()
    assert not Profile.objects.filter(name="shell").exists()


def test_a_launch_no_consumer_picks_up_says_what_it_waits_for(profile, viewer):
    """Launched from the page while no Huey consumer runs: pending for ever, unless the
    page says what it waits for (after a few seconds, as a launch takes well under one)."""
    pending = Herd.objects.create(queue="inbox", profile=profile, size=2)
    client = client_for(viewer)
    live = reverse("herds:live", args=[pending.pk])
    assert "consumer" not in client.get(live).content.decode()
    Herd.objects.filter(pk=pending.pk).update(created_at=timezone.now() - timedelta(seconds=75))
    html = client.get(reverse("herds:detail", args=[pending.pk])).content.decode()
    assert "Waiting 75 s for the task consumer" in html
    assert "python manage.py run_huey" in html
    Herd.objects.filter(pk=pending.pk).update(status=HerdStatus.RUNNING)
    assert "consumer" not in client.get(live).content.decode()


def test_a_herd_larger_than_the_cores_of_a_cpu_bound_processor_says_its_workers_take_turns(
    profile, viewer, monkeypatch
):
    """Most of its workers sit at 0% CPU with no task while the rest work: the page says
    why, rather than leave a person to think them hung."""
    monkeypatch.setattr(cpu_slots, "cores", lambda: 2)
    agent = Profile.objects.create(name="agent", processor="command", command=["agent"])
    client = client_for(viewer)
    page = {}
    for name, of, size in [("big", profile, 8), ("as_many", profile, 2), ("agents", agent, 8)]:
        herd = Herd.objects.create(queue="inbox", profile=of, size=size, status="running")
        page[name] = client.get(reverse("herds:live", args=[herd.pk])).content.decode()
    assert "Its 8 workers take turns on this machine's 2 cores" in page["big"]
    assert "at most 2 work at a time" in page["big"]
    assert "take turns" not in page["as_many"] and "take turns" not in page["agents"]
    Herd.objects.filter(queue="inbox", size=8, profile=profile).update(status="finished")
    herd = Herd.objects.get(queue="inbox", size=8, profile=profile)
    assert "take turns" not in client.get(reverse("herds:live", args=[herd.pk])).content.decode()


@pytest.mark.parametrize(
    "change, why",
    [
        ({"max_workers": 2}, "Profile noop allows at most 2 workers."),
        # A profile whose agent says no cost: the herd's cost budget could never stop it.
        ({"processor": "command", "adapter": "gemini"}, "reports no cost"),
    ],
)
def test_a_resume_the_profile_no_longer_allows_says_why(profile, viewer, caplog, change, why):
    """A herd stopped on quota resumes as a herd of the same shape; when its profile
    changed since so that the launch refuses it, the quota herd's page and the consumer's
    log say why, naming the profile (nothing happened, and nothing was said)."""
    from herds import tasks as herd_tasks

    make_tasks("inbox", 3)
    herd = Herd.objects.create(
        queue="inbox",
        profile=profile,
        size=4,
        status=HerdStatus.QUOTA,
        resume_after_quota=True,
        resume_at=timezone.now(),
        cost_budget_usd=1 if "adapter" in change else None,
    )
    Profile.objects.filter(pk=profile.pk).update(**change)

    with caplog.at_level("WARNING", logger="herds"):
        herd_tasks.resume_herd.call_local(herd.pk)

    assert not Herd.objects.filter(resumed_from=herd).exists()
    herd.refresh_from_db()
    assert herd.resume_refused.startswith("Not resumed: profile noop refuses this herd now: ")
    assert why in herd.resume_refused
    assert f"herd {herd.pk}" in caplog.text and herd.resume_refused in caplog.text
    page = client_for(viewer).get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "Not resumed: profile noop refuses this herd now" in page
    assert "A herd of the same shape starts at" not in page
    # Tried once: a second run of the task (a consumer's retry) says the same, once.
    herd_tasks.resume_herd.call_local(herd.pk)
    assert not Herd.objects.filter(resumed_from=herd).exists()


def test_a_running_herd_no_consumer_looks_at_says_so(herd, viewer, settings):
    """A herd whose consumer is down is unsupervised: nothing launches or ends. Its page
    and the list say so once the last pass is older than a few passes' period."""
    settings.HYPERVISOR_SUPERVISE_INTERVAL = 2
    client = client_for(viewer)
    said = "No consumer has looked at this herd for 7 minutes"
    hint = "is <code>manage.py start</code> (or the Huey consumer, <code>run_huey</code>) running?"

    Herd.objects.filter(pk=herd.pk).update(supervised_at=timezone.now())
    assert said[:40] not in client.get(reverse("herds:detail", args=[herd.pk])).content.decode()

    Herd.objects.filter(pk=herd.pk).update(supervised_at=timezone.now() - timedelta(minutes=7))
    for url in (reverse("herds:detail", args=[herd.pk]), reverse("herds:live", args=[herd.pk])):
        page = client.get(url).content.decode()
        assert said in page and hint in page, url
    listed = client.get(reverse("herds:list")).content.decode()
    assert "no consumer for 7 min" in listed

    # An ended herd is looked at by nobody, rightly.
    Herd.objects.filter(pk=herd.pk).update(status=HerdStatus.FINISHED)
    assert said not in client.get(reverse("herds:detail", args=[herd.pk])).content.decode()
    assert "no consumer for" not in client.get(reverse("herds:list")).content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_launch_while_hueys_queue_is_down_makes_the_herd_and_says_so(
    operator, profile, huey_down, caplog
):
    """The launch is sent once the herd's row is committed: it raised out of the view, a
    server error for a herd that was made (a consumer sends its launch again)."""
    make_tasks("inbox", 2)
    form = {"queue": "inbox", "profile": "noop", "workers": 1, "batch": 0, "confirm": "1"}
    response = client_for(operator).post(reverse("herds:launch"), form, follow=True)
    herd = Herd.objects.get()
    assert response.status_code == 200
    assert response.redirect_chain == [(reverse("herds:detail", args=[herd.pk]), 302)]
    assert (
        f"Herd {herd.pk} is made, but Huey&#x27;s queue could not be reached to launch it"
        in response.content.decode()
    )
    assert herd.status == HerdStatus.PENDING
    assert f"herd {herd.pk}: its launch could not be sent to Huey" in caplog.text


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's max_connections")
def test_a_herd_that_would_take_the_webs_database_connections_is_refused(
    operator, profile, huey_env
):
    """Each worker holds a connection: a herd of as many workers as PostgreSQL has free
    ones started, its workers waited and retried, and the board was refused meanwhile."""
    Profile.objects.filter(pk=profile.pk).update(max_workers=1000)
    make_tasks("inbox", 1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('max_connections')::int")
        most = cursor.fetchone()[0]
    form = {"queue": "inbox", "profile": "noop", "workers": most, "batch": 0, "where": ""}
    page = client_for(operator).post(reverse("herds:launch"), form).content.decode()
    assert f"A herd of {most} workers needs {most} of the database&#x27;s connections" in page
    assert "launch at most" in page and "or raise max_connections" in page
    done = run_manage(
        ["herd", "--queue", "inbox", "--profile", "noop", "--workers", str(most)], huey_env
    )
    assert done.returncode != 0
    assert f"A herd of {most} workers needs {most}" in done.stderr
    assert not Herd.objects.exists()
    # As many as it says it can take are launched.
    fewer = int(re.search(r"launch at most (\d+) workers", page).group(1))
    assert fewer > 0
    page = client_for(operator).post(reverse("herds:launch"), {**form, "workers": fewer})
    assert "connections" not in page.content.decode()
