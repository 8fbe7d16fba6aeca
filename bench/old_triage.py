"""The triage pattern Hypervisor replaces, for comparison: a queue file of paths, one `mkdir`
lock per file, the whole frontmatter re-dumped with yaml.safe_dump, workers forked with
multiprocessing. It makes the same decisions (workqueue.triage_rules), except that it
never knows a task's children, as the old script never did.

    python bench/old_triage.py QUEUE_FILE LOCK_DIR WORKERS
prints {"items": N, "written": W, "seconds": S, "duplicates": D} as JSON.
"""

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workqueue.triage_rules import Rules, decide, insert_link  # noqa: E402

RULES = Rules(human="nic", bot="bot")


def triage_file(path: str) -> bool:
    """Triage one file the old way. Returns whether it was rewritten."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    fm, body = {}, text
    if text.startswith("---\n"):
        end = text.index("\n---\n", 3)
        fm = yaml.safe_load(text[4:end]) or {}
        body = text[end + 5 :]
    title = str(fm.get("title") or Path(path).stem)
    decision = decide(fm, body, title, False, RULES)
    if not decision.set_keys and not decision.link:
        return False
    fm.update(decision.set_keys)
    if decision.link:
        body = insert_link(body, decision.link)
    with open(path, "w", encoding="utf-8") as f:
        f.write("---\n" + yaml.safe_dump(fm, sort_keys=False, allow_unicode=True) + "---\n")
        f.write(body)
    return True


def work(queue_file: str, lock_dir: str) -> tuple[int, int]:
    done = written = 0
    with open(queue_file) as f:
        paths = f.read().split()
    for path in paths:
        try:
            os.mkdir(os.path.join(lock_dir, os.path.basename(path)))
        except FileExistsError:
            continue
        written += triage_file(path)
        done += 1
    return done, written


def main() -> None:
    queue_file, lock_dir, workers = sys.argv[1:4]
    os.makedirs(lock_dir, exist_ok=True)
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(int(workers)) as pool:
        counts = pool.starmap(work, [(queue_file, lock_dir)] * int(workers))
    seconds = time.perf_counter() - started
    items = len(os.listdir(lock_dir))
    done = sum(c[0] for c in counts)
    print(
        json.dumps(
            {
                "items": items,
                "written": sum(c[1] for c in counts),
                "seconds": seconds,
                "duplicates": done - items,
            }
        )
    )


if __name__ == "__main__":
    main()
