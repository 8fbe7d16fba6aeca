"""What a web process does once at its start, before it serves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = (
    "import gc, json, sys; import hypervisor_site.{module}; "
    "print(json.dumps({{'frozen': gc.get_freeze_count(), 'tracked': len(gc.get_objects()), "
    "'views': [m for m in ('workqueue.views', 'herds.views') if m in sys.modules]}}))"
)


@pytest.mark.parametrize("module", ["wsgi", "asgi"])
def test_the_web_process_freezes_what_its_start_made(process_env, module):
    """A full collection walked every object of Django, the apps and the views, 45-57 ms
    on top of a board render about once in thirty renders: the start's objects, views
    included, are frozen out of its reach."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        env=process_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["views"] == ["workqueue.views", "herds.views"]
    assert found["frozen"] > 10 * found["tracked"], found


def test_gunicorns_master_keeps_its_environment_from_agents(process_env):
    """The README runs `gunicorn hypervisor_site.wsgi` from the repository's root. Its
    master process never imports the application, whose wsgi.py hides only the workers'
    environment: an agent running as the same user read the master's SECRET_KEY and
    DATABASE_URL in /proc/<pid>/environ. The master reads gunicorn.conf.py there."""
    master = (
        "import ctypes, sys; sys.argv = ['gunicorn', 'hypervisor_site.wsgi']; "
        "from gunicorn.app.wsgiapp import WSGIApplication; WSGIApplication(); "
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE, after its start-up
    )
    result = subprocess.run(
        [sys.executable, "-c", master],
        env=process_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "0", result.stderr
