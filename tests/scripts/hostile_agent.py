"""An agent that behaves like the hard cases of real ones, for the process-tree tests.

Usage: hostile_agent.py RECORD MODE [ARG]
Every process it starts appends "<role> <pid>" to RECORD, so a test knows what to look for.
Modes:
  hang             sleep for ever, ignoring SIGTERM
  escape           fork a child that calls setsid() and sleeps for ever; the agent sleeps too
  orphan           fork a setsid() child that sleeps for ever, then exit 0 at once
  background-exit  start `sleep 40` holding our stdout, then exit 0 (sh -c 'sleep 40 & exit 0')
  flood MB         print MB megabytes of lines, then exit 0
  env              record the environment as JSON, print it as NAME=VALUE lines, exit 0
  midline          print half a line and SIGKILL itself
  vanish           double-fork through setsid() into `sleep 60` with an empty environment
                   (no claim marker, in no group of ours, its parent gone at once), exit 0
"""

import json
import os
import signal
import subprocess
import sys
import time


def record(path: str, role: str) -> None:
    with open(path, "a") as f:
        f.write(f"{role} {os.getpid()}\n")


def sleep_for_ever() -> None:
    while True:
        time.sleep(3600)


def escaped_child(path: str) -> None:
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record(path, "escaped")
        sleep_for_ever()


def vanished_grandchild(path: str) -> None:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            record(path, "vanished")
            os.execve("/bin/sleep", ["sleep", "60"], {})  # noqa: S606 - no shell
        os._exit(0)
    os.wait()


def main() -> int:
    path, mode = sys.argv[1], sys.argv[2]
    record(path, "agent")
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("working", flush=True)
        sleep_for_ever()
    if mode == "escape":
        escaped_child(path)
        print("working", flush=True)
        sleep_for_ever()
    if mode == "vanish":
        vanished_grandchild(path)
        time.sleep(0.2)  # it has recorded itself
        print("COMPLETED: left a process behind", flush=True)
        return 0
    if mode == "orphan":
        escaped_child(path)
        time.sleep(0.5)  # the child has recorded itself
        print("COMPLETED: left a child behind", flush=True)
        return 0
    if mode == "background-exit":
        child = subprocess.Popen(["sleep", "40"])  # inherits our stdout and stderr
        with open(path, "a") as f:
            f.write(f"background {child.pid}\n")
        print("done, a child keeps the pipe", flush=True)
        os._exit(0)
    if mode == "flood":
        line = b"x" * 1023 + b"\n"
        block = line * 1024  # 1 MiB
        out = sys.stdout.buffer
        for _ in range(int(sys.argv[3])):
            out.write(block)
        out.flush()
        return 0
    if mode == "env":
        with open(path, "a") as f:
            f.write("env " + json.dumps(dict(os.environ)) + "\n")
        for name, value in sorted(os.environ.items()):
            print(f"{name}={value}")
        return 0
    if mode == "midline":
        sys.stdout.write("a line cut o")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return 2


if __name__ == "__main__":
    sys.exit(main())
