"""One run per workdir: a lock file `<workdir>/run.lock`, taken before the run writes anything.

A second run on a workdir that a live run holds stops at once with one line naming the holder (host, pid,
start time) and how to take over (docs/design.md, "Workdir layout"). Jobs of one recipe phase
(`--only_phase=branch --member=3`, launched side by side by `launch/tpu.py branches`) lock only their
part: `run.branch.3.lock`; it conflicts with the whole run (`run.lock`), with `run.branch.lock` and with
another job of member 3, not with member 4. A run first takes its own file, then looks for live
conflicting ones and, if it finds one, drops its own and refuses (two racing runs may both refuse; never
both go on). The file is JSON:

    {"host", "pid", "started" (UTC), "heartbeat" (unix seconds), "token", "argv"}

Stale locks (the holder crashed, was killed with -9, or its VM was deleted) are taken over automatically:
  * same host and the pid is no longer alive -> stale at once;
  * any host: the heartbeat (rewritten every HEARTBEAT_S by a daemon thread) is older than STALE_S.
    This is the rule for other hosts and bucket workdirs, where a pid cannot be checked; hosts' clocks
    must agree to well within STALE_S (NTP does).
A lock that is not stale can be taken over by hand: stop the holder, or delete the lock file.

Local paths are created with O_CREAT|O_EXCL (atomic). Bucket paths (gs://, via etils.epath) have no
exclusive create: the run writes its token, waits SETTLE_S and reads it back; of two runs racing within
that window the later writer wins and the earlier one refuses. Every taker re-reads the file after
writing it, so two simultaneous takeovers of a stale lock also leave one holder.

Multi-host runs hold one lock per run: process 0 takes it and broadcasts the outcome, so every process
of a refused run stops with the same message (and none of them hangs in a collective).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from voltron_jax.errors import RunLocked

LOCK_NAME = "run.lock"  # the whole run; `run.<scope>.lock` for a phase / member job
HEARTBEAT_S = 30.0
STALE_S = 300.0
SETTLE_S = 1.0  # bucket paths: wait before reading back the token (no exclusive create there)
_EMPTY_GRACE_S = 10.0  # an unreadable lock younger than this may be mid-write by its creator


def _pid_alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:  # kill(0 or -1, 0) would ask about a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def lock_name(scope: str = "") -> str:
    """'run.lock' for a whole run, 'run.<phase>.lock' / 'run.<phase>.<member>.lock' for a phase job."""
    return f"run.{scope}.lock" if scope else LOCK_NAME


def _scope_of(name: str) -> str | None:
    if name == LOCK_NAME:
        return ""
    if name.startswith("run.") and name.endswith(".lock"):
        return name[len("run.") : -len(".lock")]
    return None


def conflicts(a: str, b: str) -> bool:
    """Whether runs of scopes `a` and `b` ('' = the whole run, 'phase', 'phase.member') may not overlap."""
    return not a or not b or a == b or a.startswith(b + ".") or b.startswith(a + ".")


class RunLock:
    """The lock of one workdir (or of one phase / member job in it: `scope`). `with RunLock(workdir): ...`
    or acquire()/release(). `stale_s` / `heartbeat_s` default to STALE_S / HEARTBEAT_S (tests pass small
    values).
    """

    def __init__(self, workdir, scope: str = "", stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.workdir, self.scope = epath.Path(workdir), scope
        self.path = self.workdir / lock_name(scope)
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self._info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "heartbeat": time.time(),
            "token": self.token,
            "argv": " ".join(sys.argv)[:300],
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._prev_sigterm = None

    # ------------------------------------------------------------------ the file

    def _text(self) -> str:
        return json.dumps({**self._info, "heartbeat": time.time()})

    def read(self, path: epath.Path | None = None) -> dict | None:
        """A lock's contents (default: this run's); None if there is none; {} if it cannot be parsed."""
        try:
            text = (path or self.path).read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else {}
        except ValueError:
            return {}

    def _age_s(self, path: epath.Path) -> float:
        try:
            return time.time() - path.stat().mtime
        except (FileNotFoundError, OSError):
            return 0.0

    def _create(self) -> bool:
        """Create the lock if there is none; True if this run now holds it."""
        if _is_local(self.path):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self._text())
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.path.exists():
            return False
        self.path.write_text(self._text())
        time.sleep(SETTLE_S)
        return (self.read() or {}).get("token") == self.token

    def _write(self) -> None:
        """Rewrite the lock (heartbeat, takeover): atomic rename locally, one object write on buckets."""
        if _is_local(self.path):
            tmp = f"{os.fspath(self.path)}.{self.token}.tmp"
            with open(tmp, "w") as f:
                f.write(self._text())
            os.replace(tmp, os.fspath(self.path))
        else:
            self.path.write_text(self._text())

    def stale_reason(self, info: dict, path: epath.Path | None = None) -> str:
        """Why the lock `path` (default: this run's) held by `info` is stale ('' if its holder may live)."""
        if not info:
            age = self._age_s(path or self.path)
            return f"unreadable lock file, {age:.0f} s old" if age > _EMPTY_GRACE_S else ""
        if info.get("token") == self.token:
            return ""
        if info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
            return f"pid {info.get('pid')} on this host is gone"
        age = time.time() - float(info.get("heartbeat", 0))
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_s:.0f} s)"
        return ""

    def describe(self, info: dict, path: epath.Path | None = None) -> str:
        """One line: who holds the lock `path` (default: this run's) and how to take over."""
        path = path or self.path
        if not info:
            holder = "an unreadable lock (a run may be creating it)"
        else:
            age = time.time() - float(info.get("heartbeat", 0))
            holder = (
                f"host {info.get('host')} pid {info.get('pid')} (started {info.get('started')}, "
                f"heartbeat {age:.0f} s ago)"
            )
        return (
            f"workdir {self.workdir} is in use by another run: {holder}. Wait for it or stop it; if it "
            f"crashed, rerun (a dead pid on the same host, or no heartbeat for {self.stale_s:.0f} s, is "
            f"taken over automatically), or delete {path} to take over now."
        )

    # ------------------------------------------------------------------ acquire / release

    def _take(self) -> str:
        """Take this run's own lock file: '' if taken, else the one-line refusal."""
        for _ in range(3):  # a lock can vanish or go stale between reads
            if self._create():
                return ""
            info = self.read()
            if info is None:
                continue
            reason = self.stale_reason(info)
            if not reason:
                return self.describe(info)
            holder = f"{info.get('host')} pid {info.get('pid')}" if info else "unknown"
            logging.warning("run lock %s: taking over a stale lock (%s; %s)", self.path, holder, reason)
            print(f"run lock: taking over the stale lock of {holder} ({reason})", flush=True)
            self._write()
            time.sleep(0 if _is_local(self.path) else SETTLE_S)
            if (self.read() or {}).get("token") == self.token:
                return ""
        return self.describe(self.read() or {})

    def _conflict(self) -> str:
        """The refusal for a live lock of an overlapping scope ('' if there is none)."""
        for path in sorted(self.workdir.glob("run*.lock")):
            scope = _scope_of(path.name)
            if path.name == self.path.name or scope is None or not conflicts(self.scope, scope):
                continue
            info = self.read(path)
            if info is not None and info.get("token") != self.token and not self.stale_reason(info, path):
                return self.describe(info, path)
        return ""

    def _try_acquire(self) -> str:
        """'' if this run now holds its lock and no live run overlaps it, else the one-line refusal."""
        refusal = self._take()
        if refusal:
            return refusal
        refusal = self._conflict()
        if refusal:  # drop ours: of two runs racing here both may refuse, never both go on
            self._held = True
            self._drop()
        return refusal

    def acquire(self) -> RunLock:
        """Take the lock (process 0) or learn that process 0 took it; raise RunLocked otherwise."""
        refusal = self._try_acquire() if jax.process_index() == 0 else ""
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(refusal == ""))
            if not ok and not refusal:
                refusal = f"workdir {self.workdir} is in use by another run (see process 0's message)."
        if refusal:
            raise RunLocked(refusal)
        self._held = jax.process_index() == 0
        if self._held:
            self._thread = threading.Thread(target=self._beat, name="runlock-heartbeat", daemon=True)
            self._thread.start()
        self._install_sigterm()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                info = self.read()
                if (info or {}).get("token") != self.token:
                    logging.warning("run lock %s was taken over by another run: %s", self.path, info)
                    return
                self._write()
            except OSError as e:  # a transient storage error: try again at the next beat
                logging.warning("run lock %s: heartbeat failed (%s)", self.path, e)

    def _install_sigterm(self) -> None:
        """SIGTERM before the train loop (which saves on SIGTERM) unwinds through release().

        A Python handler already there is kept. SIG_IGN is replaced like SIG_DFL: a job runner that starts
        its children with SIGTERM ignored (CI's does; exec inherits it) must still be able to stop a run
        before its loop, as the loop's own save-on-SIGTERM handler lets it afterwards."""
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return  # multi-host: JAX's preemption notifier owns SIGTERM
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN):

            def stop(signum, frame):
                del frame
                raise SystemExit(f"stopped by signal {signum}; the run lock is released")

            self._prev_sigterm = signal.signal(signal.SIGTERM, stop)

    def release(self) -> None:
        """Drop the lock if this run still holds it (idempotent)."""
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._drop()

    def _drop(self) -> None:
        if self._held:
            self._held = False
            try:
                if (self.read() or {}).get("token") == self.token:
                    self.path.unlink()
            except OSError as e:
                logging.warning("run lock %s: could not remove it (%s)", self.path, e)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
