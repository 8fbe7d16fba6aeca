#!/usr/bin/env python3
"""A stand-in for an agent CLI: reads the task, works a little, reports in JSON.

Usage: example_agent.py PATH [--sleep SECONDS] [--block-if WORD] [--quota]
The last line of its output is the JSON completion line Hypervisor reads.
"""

import argparse
import hashlib
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", nargs="?", default=os.environ.get("HYPERVISOR_TASK_PATH", ""))
    parser.add_argument("--sleep", type=float, default=0.3)
    parser.add_argument("--block-if", default="", help="report blocked when the task mentions it")
    parser.add_argument("--quota", action="store_true", help="act as if the rate limit was hit")
    args = parser.parse_args()
    key = os.environ.get("HYPERVISOR_TASK_KEY", args.path)
    if args.quota:
        print("Error: 429 rate limit reached for this model; try again later", file=sys.stderr)
        return 1
    text = ""
    if args.path:
        with open(args.path, encoding="utf-8") as f:
            text = f.read()
    print(f"working on {key} ({len(text.split())} words)")
    time.sleep(args.sleep)
    if args.block_if and args.block_if.lower() in text.lower():
        print(
            json.dumps(
                {
                    "status": "blocked",
                    "reason": f"mentions {args.block_if!r}",
                    "next": "a person decides",
                    "tokens": len(text) // 4,
                }
            )
        )
        return 0
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    print(
        json.dumps(
            {
                "status": "done",
                "outcome": "verified complete",
                "evidence": f"read {len(text)} characters, digest {digest}",
                "tokens": 100 + len(text) // 4,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
