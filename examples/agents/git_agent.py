#!/usr/bin/env python3
"""A stand-in coding agent: writes a file in its working tree and commits it.

Usage: git_agent.py KEY [--no-commit] [--block]
Run by a profile with a worktree: its working directory is the task's own checkout.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("key")
    parser.add_argument("--no-commit", action="store_true")
    parser.add_argument("--block", action="store_true")
    args = parser.parse_args()
    Path("RESULT.md").write_text(f"# Result\n\nWritten for {args.key}.\n")
    if args.block:
        print(json.dumps({"status": "blocked", "reason": "needs a person to look"}))
        return 0
    if not args.no_commit:
        subprocess.run(["git", "add", "RESULT.md"], check=True)
        subprocess.run(
            [
                "git",
                "-c",
                "user.name=Example Agent",
                "-c",
                "user.email=agent@example.invalid",
                "commit",
                "-q",
                "-m",
                f"Result for {args.key}",
            ],
            check=True,
        )
    print(json.dumps({"status": "done", "outcome": "wrote RESULT.md"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
