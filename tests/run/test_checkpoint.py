"""Orbax checkpoints: round trip, keep-N, restore onto another mesh, partial writes ignored, clear errors,
SIGTERM flag."""

import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from voltron_jax import sharding
from voltron_jax.run import checkpoint

DATA = {"epoch": 1, "offset": 12345}
META = {
    "config": {"model": {"d_model": 64}},
    "git_commit": "abc",
    "versions": {"jax": "0.10.2"},
    "corpus_manifest": [["a.py", "00ff"]],
}


def make_state(step=7, mesh=None, spec=PartitionSpec()):
    w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
    state = {
        "params": {"w": w, "b": jnp.ones((8,), jnp.float32)},
        "opt_state": {"mu": w * 0.5},
        "step": jnp.asarray(step, jnp.int32),
    }
    if mesh is not None:
        state["params"]["w"] = jax.device_put(w, NamedSharding(mesh, spec))
    return state


def abstract(state, mesh, spec_of=lambda path: PartitionSpec()):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_of(p))), state
    )


def mesh_of(**axes):
    cfg = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1))
    cfg.update(axes)
    return sharding.make_mesh(cfg)


def assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_values_step_data_meta(tmp_path):
    state = make_state(step=7)
    with checkpoint.Checkpointer(tmp_path / "ckpt", async_save=True) as ck:
        assert ck.latest_step() is None
        assert ck.save(7, state, DATA, META)
        ck.wait()
        assert not ck.save(7, state, DATA, META, force=True)  # same step again (e.g. SIGTERM): skipped
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ck:  # a fresh process resuming
        assert ck.latest_step() == 7
        restored, data, meta = ck.restore(target=abstract(state, mesh_of(data=-1)))
        assert_tree_equal(restored, state)
        assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 7
        assert data == DATA and meta == META
        assert ck.restore_meta() == META
        as_saved, _, _ = ck.restore(7)  # no target: the saved tree as saved
        assert_tree_equal(as_saved, state)


def test_keep_n_deletes_old_steps(tmp_path):
    state = make_state()
    with checkpoint.Checkpointer(tmp_path, keep=2, async_save=False) as ck:
        for s in (1, 2, 3, 4):
            ck.save(s, state, {"offset": s}, META)
        assert ck.all_steps() == [3, 4]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
        assert ck.restore(3)[1] == {"offset": 3}


def test_restore_onto_a_different_mesh(tmp_path):
    assert jax.device_count() == 8
    saved_mesh = mesh_of(data=8)
    state = make_state(mesh=saved_mesh, spec=PartitionSpec("data", None))
    with checkpoint.Checkpointer(tmp_path) as ck:
        ck.save(3, state, DATA, META)
    new_mesh = mesh_of(data=1, fsdp=4, tensor=2)
    spec = lambda p: PartitionSpec("fsdp", "tensor") if len(p) == 2 and p[-1].key == "w" else PartitionSpec()
    target = abstract(state, new_mesh, spec)
    with checkpoint.Checkpointer(tmp_path) as ck:
        restored, _, _ = ck.restore(target=target)
    assert_tree_equal(restored, state)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert r.sharding == t.sharding
    w = restored["params"]["w"]
    assert w.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert {s.data.shape for s in w.addressable_shards} == {(4, 4)}  # 16x8 over fsdp=4 x tensor=2


def test_partial_checkpoint_is_ignored_then_cleaned(tmp_path):
    state = make_state()
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(2, state, {"offset": 2}, META)
    # killed mid-write: orbax's tmp folder (POSIX), and a step folder without the commit marker (buckets)
    shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(tmp_path / "2", tmp_path / "6")
    (tmp_path / "6" / checkpoint.COMMIT_MARKER).unlink()
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        assert ck.latest_step() == 2 and ck.all_steps() == [2]
        assert ck.restore()[1] == {"offset": 2}
        with pytest.raises(checkpoint.CheckpointError, match="available steps: \\[2\\]"):
            ck.restore(6)
        ck.save(3, state, {"offset": 3}, META)  # the next save removes the uncommitted step folder
        assert ck.all_steps() == [2, 3] and not (tmp_path / "6").exists()


def test_not_a_checkpoint_errors_and_writes_nothing(tmp_path):
    missing = tmp_path / "no" / "such"
    with checkpoint.Checkpointer(missing) as ck:
        assert ck.latest_step() is None
        with pytest.raises(checkpoint.CheckpointError, match=f"no committed checkpoint in {missing}"):
            ck.restore()
        with pytest.raises(checkpoint.CheckpointError, match="JSON"):
            ck.save(1, make_state(), {"bad": object()}, META)
    assert not (tmp_path / "no").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        checkpoint.Checkpointer(a_file)
    with checkpoint.Checkpointer(tmp_path / "run", async_save=False) as ck:
        ck.save(5, make_state(), DATA, META)
    with checkpoint.Checkpointer(tmp_path / "run" / "5") as ck:  # a step folder, not the checkpoint folder
        with pytest.raises(checkpoint.CheckpointError, match="step=5"):
            ck.restore()


def test_corrupt_checkpoint_or_wrong_target_error_names_path_and_fix(tmp_path):
    state = make_state()
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state, DATA, META)
        ck.save(2, state, DATA, META)
    mesh = mesh_of(data=-1)
    wrong = abstract({**state, "params": {"w": jnp.zeros((4, 4))}}, mesh)
    with checkpoint.Checkpointer(tmp_path) as ck:
        with pytest.raises(checkpoint.CheckpointError, match=f"(?s){tmp_path / '2'}.*restore_meta"):
            ck.restore(target=wrong)
    for p in (tmp_path / "2" / "state").iterdir():  # damage the arrays of step 2
        if p.name != checkpoint.COMMIT_MARKER:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    with checkpoint.Checkpointer(tmp_path) as ck:
        with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path / '2'}.*move it aside"):
            ck.restore(2, target=abstract(state, mesh))  # an explicit step never falls back
        restored, _, _ = ck.restore(target=abstract(state, mesh), fallback=True)  # damaged 2 moved aside
        assert_tree_equal(restored, state)
        assert ck.all_steps() == [1] and [p.name[:10] for p in tmp_path.glob("2.*")] == ["2.damaged-"]


def test_sigterm_sets_the_stop_flag():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not guard.requested and time.time() < deadline:
            time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert guard.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
