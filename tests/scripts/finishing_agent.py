"""A task command for tests: finish the task at PATH as its id says, touching its file.

done: nothing; blocked: says so on its last line; edits: adds a key and a body line;
completed: writes `status: completed` itself; removed: deletes the file; symlink: puts a
symlink in its place; closeblock: gives the body a `## Close Reason` section, then blocks.
"""

import json
import os
import sys

path, key = sys.argv[1], sys.argv[2]
kind = key.split("-")[0]
if kind == "blocked":
    print(json.dumps({"status": "blocked", "reason": "needs a key\nasked ops on Monday"}))
elif kind == "edits":
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = text.replace("\n---\n", "\nnotes: the agent was here\n---\n", 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\nThe agent's line.\n")
elif kind == "completed":
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("status: inbox", "status: completed"))
elif kind == "closeblock":
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n## Close Reason\nHalf done: the tests need a key.\n")
    print(json.dumps({"status": "blocked", "reason": "the tests need a key"}))
elif kind == "removed":
    os.remove(path)
elif kind == "symlink":
    other = os.path.join(os.path.dirname(os.path.dirname(path)), "elsewhere.md")
    os.replace(path, other)
    os.symlink(other, path)
