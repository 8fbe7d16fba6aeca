"""Workers of a CPU-bound processor take turns on the cores (workqueue.cpu_slots)."""

import fcntl
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from django.core.management import get_commands, load_command_class
from django.dispatch import receiver

from herds.models import Herd, Profile
from herds.supervision import worker_argv
from tests.conftest import make_tasks, run_manage
from workqueue import cpu_slots, signals
from workqueue.cpu_slots import CpuSlot
from workqueue.importer import Importer
from workqueue.models import EventKind, Status, Task, TaskEvent
from workqueue.processors import CommandProcessor, NoopProcessor, is_cpu_bound, load_processor
from workqueue.worker import Worker

fork = multiprocessing.get_context("fork")


def take_turns(path: str, turns: int, log: str, barrier) -> None:
    # Each line is one append: the file's order is the order things happened in.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    barrier.wait()
    with CpuSlot(path) as slot:
        pass  # the first turn opens the file
    for _ in range(turns):
        with slot:
            os.write(fd, f"{os.getpid()} in\n".encode())
            time.sleep(0.01)
            os.write(fd, f"{os.getpid()} out\n".encode())


def test_one_process_holds_a_slot_at_a_time_and_the_turn_passes_on(tmp_path):
    path = str(tmp_path / "cpu-0.slot")
    log, barrier = str(tmp_path / "turns.log"), fork.Barrier(3)
    procs = [fork.Process(target=take_turns, args=(path, 10, log, barrier)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
    events = [tuple(line.split()) for line in Path(log).read_text().splitlines()]
    assert len(events) == 60 and [proc.exitcode for proc in procs] == [0, 0, 0]
    # Never two inside at once: every "in" is followed by the same process's "out".
    turns = [events[i][0] for i in range(0, 60, 2)]
    assert all(events[i + 1] == (events[i][0], "out") for i in range(0, 60, 2))
    # The holder, once done, queues behind a waiter, so turns alternate while all three
    # have turns to take (a plain lock went back to its holder 9 times in 23 here).
    # A repeat needs the waiters to be woken and not yet run within a turn: rare.
    assert sorted(turns.count(pid) for pid in set(turns)) == [10, 10, 10]
    together = turns[: 3 * 8]
    repeats = sum(a == b for a, b in zip(together, together[1:], strict=False))
    assert repeats <= 4, together


def wait_for_the_slot(path: str, waiting, log: str) -> None:
    waiting.set()
    with CpuSlot(path):
        Path(log).write_text(f"{time.monotonic()}\n")


def test_a_turn_keeps_the_slot_over_several_blocks_until_its_time_is_over(tmp_path):
    path, log = str(tmp_path / "cpu-0.slot"), str(tmp_path / "taken.log")
    slot = CpuSlot(path, turn_seconds=0.5)
    with slot:
        started = time.monotonic()
    waiting = fork.Event()
    waiter = fork.Process(target=wait_for_the_slot, args=(path, waiting, log))
    waiter.start()
    assert waiting.wait(30)
    blocks = 0
    while time.monotonic() - started < 0.3:  # blocks within the turn: the slot stays
        with slot:
            blocks += 1
            time.sleep(0.01)
    assert blocks > 5 and not Path(log).exists() and slot.turns == 1
    time.sleep(0.25)
    with slot:  # the block that ends past the turn's time passes the slot on
        pass
    waiter.join(timeout=10)
    assert waiter.exitcode == 0
    assert float(Path(log).read_text()) - started >= 0.5
    assert slot.turns == 1


def test_release_passes_the_slot_on_before_the_turn_is_over(tmp_path):
    path, log = str(tmp_path / "cpu-0.slot"), str(tmp_path / "taken.log")
    slot = CpuSlot(path, turn_seconds=60)
    with slot:
        pass
    waiting = fork.Event()
    waiter = fork.Process(target=wait_for_the_slot, args=(path, waiting, log))
    waiter.start()
    assert waiting.wait(30)
    time.sleep(0.1)
    assert not Path(log).exists()
    slot.release()
    waiter.join(timeout=10)
    assert waiter.exitcode == 0 and Path(log).exists()
    slot.release()  # once released, again does nothing


def hold_for_ever(path: str, ready) -> None:
    with CpuSlot(path):
        ready.set()
        time.sleep(600)


def test_a_holder_killed_with_sigkill_frees_its_slot(tmp_path):
    path = str(tmp_path / "cpu-0.slot")
    ready = fork.Event()
    holder = fork.Process(target=hold_for_ever, args=(path, ready))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=10)

    log = str(tmp_path / "turns.log")
    waiter = fork.Process(target=take_turns, args=(path, 1, log, fork.Barrier(1)))
    waiter.start()
    waiter.join(timeout=10)
    assert waiter.exitcode == 0
    assert Path(log).read_text() == f"{waiter.pid} in\n{waiter.pid} out\n"


def test_only_cpu_bound_processors_with_more_workers_than_cores_take_turns():
    cores = cpu_slots.cores()
    assert cpu_slots.needed(cores + 1, NoopProcessor().cpu_bound)
    assert not cpu_slots.needed(cores, NoopProcessor().cpu_bound)
    assert not cpu_slots.needed(cores + 1, CommandProcessor(["true"]).cpu_bound)
    assert is_cpu_bound("noop") and is_cpu_bound("triage") and not is_cpu_bound("command")


def overlap(lines: list[str]) -> int:
    """The most processes inside `process` at one moment."""
    edges = []
    for line in lines:
        _, start, end = line.split()
        edges += [(float(start), 1), (float(end), -1)]
    inside = most = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        inside += step
        most = max(most, inside)
    return most


@pytest.mark.parametrize("turn_ms", [0, 60_000])
def test_forked_workers_of_a_cpu_bound_processor_run_at_most_one_per_core(
    process_env, lock_root, tmp_path, turn_ms
):
    make_tasks("q", 180)
    probe = tmp_path / "probe.log"
    workers = cpu_slots.cores() + 4
    result = run_manage(
        [
            *("work", "--queue", "q", "--workers", str(workers), "--prefetch", "5", "--json"),
            *("--processor", "tests.scripts.overlap_probe.Probe"),
        ],
        {**process_env, "OVERLAP_PROBE_FILE": str(probe), "HYPERVISOR_CPU_TURN_MS": str(turn_ms)},
    )

    assert result.returncode == 0, result.stderr
    summaries = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert sum(s["done"] for s in summaries) == 180
    assert Task.objects.filter(queue="q", status=Status.DONE, attempts=1).count() == 180
    assert TaskEvent.objects.filter(kind=EventKind.CLAIMED).count() == 180
    lines = probe.read_text().splitlines()
    assert len(lines) == 180
    assert overlap(lines) <= cpu_slots.cores()
    working = [s for s in summaries if s["claimed"]]
    if turn_ms == 0:  # the turn passes on after every batch: every worker got some work
        assert len(working) == workers, summaries
    else:  # a turn longer than the run: the first holders did it all, a batch after another
        assert len(working) == cpu_slots.cores(), summaries


@pytest.mark.django_db
def test_a_herd_of_a_cpu_bound_profile_larger_than_the_cores_gives_each_worker_a_slot():
    noop = Profile.objects.update_or_create(name="noop", defaults={"processor": "noop"})[0]
    agent = Profile.objects.create(name="agent", processor="command", command=["agent"])
    size = cpu_slots.cores() + 2
    big = Herd.objects.create(queue="inbox", profile=noop, size=size)
    slots = [
        worker_argv(big, big.workers.create(index=i, name=f"w{i}", host="h")) for i in range(size)
    ]
    paths = [a.removeprefix("--cpu-slot=") for argv in slots for a in argv if "--cpu-slot" in a]
    # Round robin: one slot file per core, shared by every cores-th worker.
    assert len(set(paths)) == cpu_slots.cores()
    assert paths[0] == paths[cpu_slots.cores()] != paths[1]

    for herd in (
        Herd.objects.create(queue="inbox", profile=agent, size=size),
        Herd.objects.create(queue="inbox", profile=noop, size=cpu_slots.cores()),
    ):
        worker = herd.workers.create(index=0, name="w0", host="h")
        assert not [a for a in worker_argv(herd, worker) if "--cpu-slot" in a]


def cgroup(tmp_path, membership: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "membership").write_text(membership)
    return root, tmp_path / "membership"


@pytest.mark.parametrize(
    ("membership", "files", "quota"),
    [
        # cgroup v2, the quota on the group's own folder, or on one above it.
        ("0::/box/job\n", {"box/job/cpu.max": "150000 100000\n"}, 1.5),
        ("0::/box/job\n", {"box/job/cpu.max": "max 100000\n", "box/cpu.max": "200000 100000"}, 2),
        # Inside a container: the group's path is not mounted, its files are at the root.
        ("0::/docker/abc\n", {"cpu.max": "50000 100000\n"}, 0.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # cgroup v1 (a hybrid machine lists v2's empty line too); -1 is no quota.
        (
            "4:memory:/x\n1:cpu,cpuacct:/x\n0::/\n",
            {"cpu/x/cpu.cfs_quota_us": "300000\n", "cpu/x/cpu.cfs_period_us": "100000\n"},
            3,
        ),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000"}, None),
        # Nothing readable, or nonsense: no quota rather than an error.
        ("0::/\n", {}, None),
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "0"}, None),
    ],
)
def test_the_cpu_quota_of_a_control_group_is_read_as_cores(tmp_path, membership, files, quota):
    root, path = cgroup(tmp_path, membership, files)
    assert cpu_slots.quota_cores(root, path) == quota


def test_a_quota_smaller_than_the_cores_deals_that_many_slots(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpu_slots, "quota_cores", lambda: 1.5)
    assert cpu_slots.cores() == 2
    assert cpu_slots.needed(3, NoopProcessor().cpu_bound)
    paths = {cpu_slots.slot_path(tmp_path, index) for index in range(8)}
    assert len(paths) == 2
    monkeypatch.setattr(cpu_slots, "quota_cores", lambda: None)
    assert cpu_slots.cores() == 64 and not cpu_slots.needed(3, NoopProcessor().cpu_bound)


def slot_is_free(path: str) -> bool:
    """Whether another process could take the slot now (record locks are per process)."""

    def probe():
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, cpu_slots.SLOT)
        except OSError:
            os._exit(1)
        os._exit(0)

    child = fork.Process(target=probe)
    child.start()
    child.join(timeout=10)
    return child.exitcode == 0


def test_triage_passes_its_turn_on_before_its_files_wait_on_the_disk_and_noop_keeps_it(
    db, write_task, tmp_path
):
    # Triage's batch ends in syncfs and renames that sleep in the kernel: holding the
    # core's slot through them left that core idle (+4-9% items/s, A/B). A no-op batch's
    # finish writes each status word in place, work on the CPU: passing the turn on
    # before it let more workers than cores run (8 on 2 cores 35% slower than 2).
    for i in range(3):
        write_task(f"t{i}.md", f"---\nid: t{i}\ntitle: Fix /src/x{i}.py\n---\nbody\n")
    Importer("inbox", roots=[write_task.folder]).run([write_task.folder])
    path = str(tmp_path / "cpu-0.slot")
    free_while = {}

    def during_process(worker, name):
        process = worker.processor.process

        def watched(claim, context):
            free_while.setdefault(name, slot_is_free(path))
            return process(claim, context)

        worker.processor.process = watched

    @receiver(signals.tasks_processed)
    def writing(sender, **kwargs):
        free_while.setdefault("writing", slot_is_free(path))

    for processor, name in (("triage", "triage"), ("noop", "noop")):
        worker = Worker("inbox", load_processor(processor), prefetch=10)
        worker.cpu_slot = CpuSlot(path, turn_seconds=60)
        during_process(worker, f"{name} processing")
        free_while.pop("writing", None)
        assert worker.work_one_batch()
        free_while[f"{name} writing"] = free_while.pop("writing")
        worker.cpu_slot.release()
        Task.objects.update(status=Status.QUEUED, holder="")
    signals.tasks_processed.disconnect(writing)
    assert free_while == {
        "triage processing": False,
        "triage writing": True,
        "noop processing": False,
        "noop writing": False,
    }


@pytest.mark.django_db
def test_a_worker_of_a_profile_named_with_a_leading_dash_parses_its_arguments():
    """`-fast` is a slug the admin takes; `--profile -fast` read it as an option and
    every worker of the herd died on argparse."""
    profile = Profile(name="-fast", processor="noop")
    profile.full_clean()
    profile.save()
    herd = Herd.objects.create(queue="q", profile=profile, size=1, filters=["project=-x"])
    worker = herd.workers.create(index=0, name="herd-w0", host="h")
    command = load_command_class(get_commands()["work"], "work")
    options = command.create_parser("manage.py", "work").parse_args(worker_argv(herd, worker))
    assert (options.profile, options.where, options.herd) == ("-fast", ["project=-x"], herd.pk)
