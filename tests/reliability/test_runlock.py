"""Issue 16 item 1: one run per workdir. A second run refuses at once with one line naming the holder
(host, pid, start time) and how to take over; stale locks (dead pid on this host, or no heartbeat for
runlock.STALE_S) are taken over; the lock is released on exit, exceptions and SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from configs import tiny
from tests.reliability.common import ROOT, env, finish, line_with, start, wait_for
from voltron_jax.errors import RunLocked
from voltron_jax.run import runlock


def _holder(workdir) -> subprocess.Popen:
    """A live process holding the lock of `workdir` (it prints 'held' once it has it)."""
    code = (
        "import sys, time; from voltron_jax.run import runlock; "
        f"lock = runlock.RunLock({str(workdir)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env(quiet=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_lock_refuses_with_holder_and_takeover_hint(tmp_path):
    with runlock.RunLock(tmp_path) as first:
        info = json.loads((tmp_path / runlock.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunLocked) as e:
            runlock.RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert "\n" not in msg
        for part in (
            f"host {socket.gethostname()}",
            f"pid {os.getpid()}",
            info["started"],
            "delete",
            "crashed",
        ):
            assert part in msg, (part, msg)
        assert first.read()["token"] == first.token  # the refused run did not touch the lock
    assert not (tmp_path / runlock.LOCK_NAME).exists()  # released on exit
    with pytest.raises(ValueError):
        with runlock.RunLock(tmp_path):
            raise ValueError("boom")
    assert not (tmp_path / runlock.LOCK_NAME).exists()  # released on exceptions


def test_dead_pid_on_this_host_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: a run killed with -9
    stale = {
        "host": socket.gethostname(),
        "pid": gone.pid,
        "started": "x",
        "heartbeat": time.time(),
        "token": "t",
    }
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(stale))
    with runlock.RunLock(tmp_path) as lock:
        assert lock.read()["pid"] == os.getpid()
    assert f"pid {gone.pid} on this host is gone" in capsys.readouterr().out


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path):
    def lock_of(age):
        info = {"host": "other-vm", "pid": 1, "started": "x", "heartbeat": time.time() - age, "token": "t"}
        (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(info))

    lock_of(age=10)  # a live run on another host: its pid cannot be checked, its heartbeat is fresh
    with pytest.raises(RunLocked, match="host other-vm pid 1"):
        runlock.RunLock(tmp_path).acquire()
    lock_of(age=runlock.STALE_S + 1)
    with runlock.RunLock(tmp_path) as lock:
        assert lock.read()["host"] == socket.gethostname()


def test_heartbeat_keeps_a_long_run_fresh(tmp_path):
    with runlock.RunLock(tmp_path, heartbeat_s=0.05) as lock:
        t0 = lock.read()["heartbeat"]
        wait_for(lambda: lock.read()["heartbeat"] > t0 + 0.1, timeout=10, what="a heartbeat")


def test_fresh_unreadable_lock_is_held_old_one_is_stale(tmp_path):
    path = tmp_path / runlock.LOCK_NAME
    path.write_text("")  # a run between creating the file and writing it
    with pytest.raises(RunLocked, match="unreadable"):
        runlock.RunLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    with runlock.RunLock(tmp_path):
        pass


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_sigterm_before_the_loop_releases_the_lock(tmp_path, inherited):
    """Also when the process starts with SIGTERM ignored (exec inherits SIG_IGN from a job runner: CI's)."""
    code = (
        "import time; from voltron_jax.run import runlock\n"
        f"with runlock.RunLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env(quiet=True),
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, inherited),
    )
    assert p.stdout.readline().strip() == "held"
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert p.returncode != 0 and not (tmp_path / runlock.LOCK_NAME).exists()


@pytest.mark.slow  # a real training run once the holder dies
def test_second_main_refuses_at_once_and_writes_nothing(tmp_path):
    """A real `python -m voltron_jax.main` against a workdir a live process holds: one line naming it,
    a non-zero exit, no config.json/run_info.json written; after the holder dies (kill -9) a run goes."""
    holder = _holder(tmp_path)
    try:
        # the holder's run config, compact (write_run_info indents: an overwrite would change the bytes)
        holders = json.dumps(tiny.get_config("test").to_dict())
        (tmp_path / "config.json").write_text(holders)
        t0 = time.time()
        code, out = finish(start(tmp_path, "--config.max_steps=2"))
        line = line_with(out, "is in use by another run")
        assert code != 0 and f"pid {holder.pid}" in line and socket.gethostname() in line
        assert time.time() - t0 < 60  # startup only: no compile, no training
        assert (tmp_path / "config.json").read_text() == holders
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", runlock.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_phase_jobs_lock_their_part_only():
    """`launch/tpu.py branches` runs each fan-out member as its own job on one workdir: members run side
    by side; a whole run, the whole phase or the same member conflicts with them."""
    assert not runlock.conflicts("branch.3", "branch.4") and not runlock.conflicts("branch.3", "mix")
    for a, b in (("", "branch.3"), ("branch", "branch.3"), ("branch.3", "branch.3"), ("", "")):
        assert runlock.conflicts(a, b) and runlock.conflicts(b, a)


def test_member_jobs_run_side_by_side_but_not_beside_a_whole_run(tmp_path):
    with runlock.RunLock(tmp_path, "branch.3"), runlock.RunLock(tmp_path, "branch.4"):
        assert (tmp_path / "run.branch.3.lock").exists() and (tmp_path / "run.branch.4.lock").exists()
        with pytest.raises(RunLocked, match="run.branch.3.lock"):
            runlock.RunLock(tmp_path).acquire()
        with pytest.raises(RunLocked, match="run.branch.3.lock"):
            runlock.RunLock(tmp_path, "branch").acquire()
        assert not (tmp_path / runlock.LOCK_NAME).exists()  # the refused run dropped its own file
    with runlock.RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"delete {tmp_path / runlock.LOCK_NAME}"):
            runlock.RunLock(tmp_path, "branch.3").acquire()
    assert list(tmp_path.iterdir()) == []


def test_bucket_paths_write_then_read_back(tmp_path, monkeypatch):
    """Bucket paths (no exclusive create) go through epath and a read-back of the token; here on a local
    folder with the bucket branch forced."""
    monkeypatch.setattr(runlock, "_is_local", lambda path: False)
    monkeypatch.setattr(runlock, "SETTLE_S", 0.01)
    with runlock.RunLock(tmp_path, heartbeat_s=0.05) as lock:
        with pytest.raises(RunLocked, match="is in use by another run"):
            runlock.RunLock(tmp_path).acquire()
        # A local write_text truncates then writes, so a read can land between the two and see an empty
        # file (a bucket object write is atomic); the code reads that as {} and so does this test.
        beat = lambda: (lock.read() or {}).get("heartbeat", 0.0)  # noqa: E731
        wait_for(lambda: beat() > 0, timeout=10, what="a readable lock")
        t0 = beat()
        wait_for(lambda: beat() > t0, timeout=10, what="a heartbeat")
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    stale = {"host": "gone-vm", "pid": 1, "started": "x", "heartbeat": time.time() - runlock.STALE_S - 1}
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({**stale, "token": "t"}))
    with runlock.RunLock(tmp_path) as lock:
        assert lock.read()["token"] == lock.token
