"""`make bench`: every benchmark, each in its own process, printed as one JSON object.

Each bench_*.py prints JSON alone; a failing one is reported, and the others still run.
    python bench/run.py [NAME ...]  (core, startup, herds, board, triage, scale, bulk, agents, mcp)
"""

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["core", "startup", "herds", "board", "triage", "scale", "bulk", "agents", "mcp"]


def main() -> int:
    names = sys.argv[1:] or [n for n in ORDER if (HERE / f"bench_{n}.py").exists()]
    results, failed = {}, False
    for name in names:
        started = time.monotonic()
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, str(HERE / f"bench_{name}.py")], capture_output=True, text=True
        )
        try:
            results[name] = json.loads(done.stdout)
        except ValueError:
            failed = True
            results[name] = {"error": f"exit {done.returncode}", "stderr": done.stderr[-2000:]}
        results[name]["bench_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
