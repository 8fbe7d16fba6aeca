"""Run manage.py as a host whose clock is off by SECONDS (negative: behind).

Usage: skewed_clock.py SECONDS manage.py-arguments...

Every time the project writes or judges is read through django.utils.timezone.now, which
is shifted here: a stand-in for a second machine whose clock disagrees with the database
server's, which one machine cannot have. The database server keeps the true time.
"""

import runpy
import sys
from datetime import timedelta
from pathlib import Path

from django.utils import timezone

ROOT = Path(__file__).resolve().parents[2]
MANAGE = str(ROOT / "manage.py")
sys.path.insert(0, str(ROOT))

offset = timedelta(seconds=float(sys.argv[1]))
true_now = timezone.now
timezone.now = lambda: true_now() + offset
sys.argv = [MANAGE, *sys.argv[2:]]
runpy.run_path(MANAGE, run_name="__main__")
