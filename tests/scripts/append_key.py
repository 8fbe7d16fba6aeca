"""A task command for tests: append the task key to a shared log, one line per run."""

import os
import sys

log_path, key = sys.argv[1], sys.argv[2]
fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (key + "\n").encode())
os.close(fd)
