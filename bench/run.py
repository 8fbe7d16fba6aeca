"""`make bench`: every benchmark, each in its own process, printed as one JSON object.

Each bench_*.py prints JSON alone; a failing one is reported, and the others still run.
    python bench/run.py [NAME ...]
    (core, core_postgres, startup, herds, board, triage, scale, bulk, agents, mcp)
"""

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Each name runs bench/bench_NAME.py, but for those that run a bench with arguments.
ARGUMENTS = {"core_postgres": ("core", "--postgres")}
ORDER = ["core", "core_postgres", "startup", "herds", "board", "triage", "scale", "bulk"]
ORDER += ["agents", "mcp"]


def command(name: str) -> list[str]:
    bench, *arguments = ARGUMENTS.get(name, (name,))
    return [sys.executable, str(HERE / f"bench_{bench}.py"), *arguments]


def main() -> int:
    names = sys.argv[1:] or ORDER
    results, failed = {}, False
    for name in names:
        started = time.monotonic()
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command(name), capture_output=True, text=True)
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
