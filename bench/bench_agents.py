"""How fast the adapters read an agent's stream, live transcript file included.

Each adapter reads a long replay of its CLI's sample output (tests/fixtures/agent_formats),
line by line as AgentRun hands it over, writing its transcript as it would while an agent
runs. An agent prints a few lines a second; the reading must cost nothing beside it.
`python bench/bench_agents.py` prints JSON; bench/run.py calls it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "agent_formats"
STREAMS = {
    "claude": "claude_stream.jsonl",
    "gemini": "gemini_stream.jsonl",
    "codex": "codex_exec.jsonl",
}
LINES = 100_000
TARGETS = {"lines_per_second": 50_000}


def main() -> dict:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hypervisor_site.settings")
    import django

    django.setup()
    from workqueue.agents import AgentOptions, Transcript, adapter_class

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, sample in STREAMS.items():
            lines = (SAMPLES / sample).read_text().splitlines()
            replay = (lines * (LINES // len(lines) + 1))[:LINES]
            runs = []
            for attempt in range(3):
                transcript = Transcript(Path(folder, f"{name}-{attempt}.json"))
                adapter = adapter_class(name)(AgentOptions(), transcript)
                started = time.perf_counter()
                for line in replay:
                    adapter.feed("stdout", line)
                result = adapter.result(0, "", "", "k")
                transcript.close()
                runs.append(time.perf_counter() - started)
            seconds = statistics.median(runs)
            results[name] = {
                "lines": LINES,
                "seconds": round(seconds, 3),
                "lines_per_second": round(LINES / seconds),
                "microseconds_per_line": round(1e6 * seconds / LINES, 2),
                "status": result.status,
                "runs": [round(r, 3) for r in runs],
            }
    slowest = min(r["lines_per_second"] for r in results.values())
    return {"adapters": results, "targets": TARGETS, "met": slowest >= TARGETS["lines_per_second"]}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
