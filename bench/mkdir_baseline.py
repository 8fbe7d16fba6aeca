"""The hand-made pattern Hypervisor replaces: a queue file of paths, `mkdir` locks,
a result file per item, workers forked with multiprocessing.

    python bench/mkdir_baseline.py QUEUE_FILE LOCK_DIR RESULT_DIR WORKERS [--write-status]
prints {"items": N, "seconds": S, "duplicates": D} as JSON.

With --write-status each item's task file is given `status: done` as `sed -i` gives it
(a temporary beside it, renamed over it, no sync), as a script that keeps its folder
saying what is done would, and as a Hypervisor finish does (durably: it syncs first).
"""

import json
import multiprocessing
import os
import re
import sys
import time

STATUS = re.compile(rb"^status:.*$", re.M)


def write_status(path: str, text: bytes) -> None:
    temporary = f"{path}.sed{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(STATUS.sub(b"status: done", text, count=1))
    os.replace(temporary, path)


def work(queue_file: str, lock_dir: str, result_dir: str, status: bool = False) -> int:
    done = 0
    with open(queue_file) as f:
        paths = f.read().split()
    for path in paths:
        name = os.path.basename(path)
        try:
            os.mkdir(os.path.join(lock_dir, name))
        except FileExistsError:
            continue
        with open(path, "rb") as task:
            text = task.read()
        if status:
            write_status(path, text)
        with open(os.path.join(result_dir, name + ".done"), "w") as result:
            result.write("done\n")
        done += 1
    return done


def main() -> None:
    queue_file, lock_dir, result_dir, workers = sys.argv[1:5]
    status = sys.argv[5:] == ["--write-status"]
    os.makedirs(lock_dir, exist_ok=True)
    os.makedirs(result_dir, exist_ok=True)
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(int(workers)) as pool:
        counts = pool.starmap(work, [(queue_file, lock_dir, result_dir, status)] * int(workers))
    seconds = time.perf_counter() - started
    items = len(os.listdir(result_dir))
    print(json.dumps({"items": items, "seconds": seconds, "duplicates": sum(counts) - items}))


if __name__ == "__main__":
    main()
