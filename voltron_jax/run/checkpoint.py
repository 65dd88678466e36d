"""Orbax checkpoints: save, list, restore (onto any mesh), and SIGTERM-triggered saves. No model knowledge.

A checkpoint is one Orbax step folder with three items:
    state   a pytree of arrays (params, opt_state, step), saved sharded (OCDBT/tensorstore)
    data    JSON: the data iterator state (resume is exact)
    meta    JSON: resolved config, git commit, package versions, corpus manifest (self-describing)

Restoring takes a target tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`: each array is read
straight into the target's sharding, so a checkpoint saved on one mesh (data=8) restores onto another
(fsdp=4 x tensor=2) without a gather. Directories may be local paths or bucket URLs (etils.epath).

Incomplete checkpoints are never chosen. Orbax writes a step into a temporary folder and renames it
(POSIX) or writes in place and then a `commit_success.txt` marker (object stores); it writes the marker
in both modes. A step counts here only if its folder holds that marker, so a killed write (a leftover
tmp folder, or a step folder without the marker) is ignored, and removed before the next save.

Faults (issue 16): a failed async save (disk full, lost bucket permission) is raised as `SaveFailed` by
`check()`, which the train loop calls at every step boundary, naming the path and the last committed
step. A damaged newest checkpoint (a truncated array or JSON file) is skipped when the loop resumes
(`restore(fallback=True)`): the newest step that restores cleanly with the same target is used, and each
newer one that failed is moved aside to `<step>.damaged-<UTC time>` (never deleted; Orbax ignores such
names). A failure is blamed on the folder only when an older step restores with the same target, so a
changed model (a target mismatch that fails on every step) moves nothing and raises as before. Tools
reading a checkpoint (restore without fallback) get the error and move nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from voltron_jax.errors import VoltronError

COMMIT_MARKER = "commit_success.txt"
ITEMS = ("state", "data", "meta")


class CheckpointError(VoltronError, RuntimeError):
    """A checkpoint folder that cannot be used; the message names the path and the fix."""


class SaveFailed(CheckpointError):
    """A checkpoint save failed (e.g. disk full); the message names the path and the last committed step."""


def short_error(e: BaseException, limit: int = 160) -> str:
    """One line for an Orbax/tensorstore error: the OS error if it names one, else the first line, cut."""
    text = str(e)
    os_error = re.search(r"([A-Z][A-Za-z ]+) \[os_error_code", text)
    if os_error:
        return os_error.group(1)
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = f"{type(e).__name__}: {first}"
    return first if len(first) <= limit else first[: limit - 3] + "..."


class Checkpointer:
    """CheckpointManager for one phase folder: async saves, keep-N, committed steps only.

    Nothing is written until the first `save` (restoring from a wrong path creates no folder).
    """

    def __init__(self, directory, keep: int = 2, async_save: bool = True):
        # Orbax's tensorstore writer needs absolute local paths (bucket URLs are absolute already).
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"{self.directory} is a file, not a checkpoint folder; point the workdir "
                "at a folder (it is created on the first save)."
            )
        if keep < 1:
            raise CheckpointError(f"keep={keep}: keep at least 1 checkpoint (train.keep).")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=False
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._cleaned = False
        self._pending: int | None = None  # the step of the last save started (for SaveFailed)

    # ------------------------------------------------------------------ listing

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _committed(self, step: int) -> bool:
        return (self._step_dir(step) / COMMIT_MARKER).exists()

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(s for s in self._mgr.all_steps() if self._committed(s))

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save

    def _drop_uncommitted(self) -> None:
        """Remove step folders of killed writes, so orbax neither counts nor collides with them."""
        self._mgr.wait_until_finished()
        stale = [s for s in self._mgr.all_steps() if not self._committed(s)]
        if stale and jax.process_index() == 0:
            for s in stale:
                logging.warning("checkpoint: removing incomplete step folder %s", self._step_dir(s))
                self._step_dir(s).rmtree()
        if stale:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("voltron_jax.run.checkpoint.drop_uncommitted")
            self._mgr.reload()
        self._cleaned = True

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Save `state` (pytree of arrays) with the data iterator state and run metadata (JSON).

        Asynchronous unless async_save=False; returns whether a save started. A step that is already
        committed is skipped (e.g. a SIGTERM save at the step a periodic save just wrote).
        """
        for name, obj in (("data_state", data_state), ("meta", meta)):
            try:
                json.dumps(obj)
            except (TypeError, ValueError) as e:
                raise CheckpointError(
                    f"checkpoint {self._step_dir(step)}: {name} is not JSON-serialisable "
                    f"({e}); pass plain dicts/lists/str/numbers. Nothing was written."
                ) from e
        if not self._cleaned:
            self._drop_uncommitted()
        if step in self._mgr.all_steps():
            self._mgr.wait_until_finished()
            if self._committed(step):
                return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.wait()  # Orbax waits for the previous save here anyway; its failure is raised naming its step
        self._pending = step
        try:
            return self._mgr.save(step, args=args, force=force)
        except Exception as e:  # the synchronous part (folders, metadata) can fail too
            raise self._save_failed(e) from e

    def _save_failed(self, e: BaseException) -> SaveFailed:
        step = self._pending
        try:
            last = self.latest_step()
        except Exception:  # noqa: BLE001 - the storage may be gone altogether
            last = None
        where = self._step_dir(step) if step is not None else self.directory
        kept = (
            f"the last committed step is {last}, intact in {self.directory}"
            if last is not None
            else f"no step is committed in {self.directory}"
        )
        return SaveFailed(
            f"checkpoint save failed at {where}: {short_error(e)}; {kept}. Free space (or fix the storage) "
            "and rerun the same command to resume."
        )

    def check(self) -> None:
        """Raise SaveFailed if an asynchronous save has failed. Cheap: returns at once while a save is
        still running (it is checked again at the next call) and when none failed."""
        if self._mgr.is_saving_in_progress():
            return
        try:
            self._mgr.wait_until_finished()  # re-raises the finished save thread's error, if any
        except Exception as e:
            raise self._save_failed(e) from e

    # ------------------------------------------------------------------ restore

    def _resolve(self, step: int | None) -> int:
        self._mgr.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                hint = ""
                if self.directory.name.isdigit() and (self.directory / COMMIT_MARKER).exists():
                    hint = (
                        f" It looks like a step folder itself: use Checkpointer({self.directory.parent}) "
                        f"and step={self.directory.name}."
                    )
                raise CheckpointError(
                    f"no committed checkpoint in {self.directory}.{hint} Check the path "
                    "(the phase's ckpt/ folder), or run the phase that writes it first."
                )
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"step {step} has no committed checkpoint in {self.directory}; available "
                f"steps: {steps}. Pass one of them, or step=None for the latest."
            )
        return step

    def _restore_error(self, step: int, e: BaseException, what: str, intact: bool = False) -> CheckpointError:
        """`intact`: every committed step failed with this target, so the target changed, not the files:
        the message must not advise moving a good checkpoint aside (it would be retrained from scratch)."""
        head = f"cannot restore {what} from checkpoint {self._step_dir(step)}: {short_error(e, 300)}. "
        changed = (
            "If the config changed a field that changes the state tree or shapes (model, optimizer), set "
            "it back, or read the checkpoint with the config stored in it (restore_meta)"
        )
        if intact:
            return CheckpointError(
                f"{head}Every committed step in {self.directory} fails the same way, so the checkpoints are "
                f"intact and the config differs from theirs. {changed}. Nothing was moved or deleted."
            )
        return CheckpointError(
            f"{head}{changed}. Only if its files are damaged (an older step restores with this config), "
            f"move it aside (rename {step} to {step}.damaged, never delete it) and rerun."
        )

    def _restore(self, step: int, args: ocp.args.Composite, what: str):
        try:
            return self._mgr.restore(step, args=args)
        except Exception as e:  # orbax/tensorstore raise many types; one message names path and fix
            raise self._restore_error(step, e, what) from e

    def _agree(self, ok: bool) -> bool:
        """Multi-host: a step restored cleanly only if it did on every process."""
        if jax.process_count() == 1:
            return ok
        return bool(multihost_utils.process_allgather(jax.numpy.int32(ok)).min())

    def _restore_newest(self, args: ocp.args.Composite, what: str, move_aside: bool):
        """(step, restored) of the newest committed step that restores cleanly; with `move_aside`, newer
        ones that failed are moved aside. Raises the newest step's error (moving nothing) if none restores."""
        self._resolve(None)  # waits for pending saves; raises 'no committed checkpoint' if there is none
        failed: list[tuple[int, BaseException]] = []
        for step in reversed(self.all_steps()):
            try:
                out, err = self._mgr.restore(step, args=args), None
            except Exception as e:  # noqa: BLE001 - any reader error marks the step as unusable
                out, err = None, e
            if self._agree(err is None):
                for bad, bad_err in failed if move_aside else []:
                    self._move_aside(bad, bad_err, step)
                return step, out
            failed.append((step, err or CheckpointError(f"another process could not restore step {step}")))
        step, err = failed[0]
        raise self._restore_error(step, err, what, intact=len(failed) > 1) from err

    def _move_aside(self, step: int, err: BaseException, fallback: int) -> None:
        """Rename a damaged step folder to <step>.damaged-<UTC time> (kept for inspection, never deleted)."""
        src = self._step_dir(step)
        dst = self.directory / f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        if jax.process_index() == 0:
            src.rename(dst)
            print(
                f"checkpoint {src} is damaged ({short_error(err)}): moved it to {dst.name} and restored step "
                f"{fallback} instead",
                flush=True,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"voltron_jax.run.checkpoint.move_aside.{step}")
        self._mgr.reload()

    def restore(self, step: int | None = None, target=None, fallback: bool = False) -> tuple:
        """(state, data_state, meta) of `step` (default: the latest committed one).

        `target`: a tree like the saved state whose leaves are `jax.ShapeDtypeStruct`s with shardings (or
        arrays); each array is restored onto its target sharding. None restores the saved tree as saved
        (same devices required; containers come back as dicts/lists). With step=None and `fallback` (the
        train loop's resume), a damaged newest step is moved aside and the newest clean one is used
        (module docstring); without (tools, a finished phase's final state) a damaged step raises.
        """
        state_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        args = ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        if step is None and fallback:
            _, out = self._restore_newest(args, "state", move_aside=True)
        else:
            out = self._restore(self._resolve(step), args, "state")
        return out["state"], out["data"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the run metadata (config, commit, versions, manifest) of `step` (default: the newest
        committed step whose metadata reads; a damaged newer one is skipped, not moved)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        if step is None:
            return self._restore_newest(args, "meta", move_aside=False)[1]["meta"]
        return self._restore(self._resolve(step), args, "meta")["meta"]

    def wait(self) -> None:
        """Block until pending async saves are committed; SaveFailed if one failed."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """SIGTERM -> save and stop at a step all hosts agree on.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    save(step); break

    Single process: a SIGTERM handler sets a flag (the default action, killing the process, is
    suppressed while the guard is active; the previous handler comes back on exit). Multi-process
    (jax.distributed initialised, process_count > 1): JAX's preemption sync manager catches the
    notice on any host and `reached_preemption_sync_point` turns True on every host at the same step;
    no Python handler is installed there, since it would replace JAX's own.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        del frame
        logging.warning("received signal %d: will save a checkpoint and stop at the next step", signum)
        self._flag.set()

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() == 1:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "PreemptionGuard must be entered on the main thread (Python delivers signals there only)."
                )
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self._flag.is_set()

    def should_stop(self, step: int) -> bool:
        """True when the loop should save at `step` and exit (the same step on every host)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()
