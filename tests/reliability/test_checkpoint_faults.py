"""Issue 16 items 2 and 3 on the Checkpointer itself (fast): a failed async save on a real full disk
(a 2 MiB tmpfs) is raised by check() naming the path and the last committed step; a damaged newest
checkpoint is moved aside (never deleted) and the newest clean step restores."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reliability import common
from voltron_jax.run import checkpoint

META = {"config": {"d": 1}}


def _state(step, n=256):
    return {"step": jnp.asarray(step), "w": jax.random.normal(jax.random.key(step), (n,))}


def _saved(tmp_path, steps=(1, 2)):
    with checkpoint.Checkpointer(tmp_path, keep=5, async_save=False) as ck:
        for s in steps:
            ck.save(s, _state(s), {"offset": s}, META)
    return tmp_path


def _truncate(*files):
    """Cut files to half their size, as a full disk or a torn copy leaves them."""
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["state_array", "state_metadata", "data_metadata"])
def test_damaged_newest_step_is_moved_aside_and_the_older_one_restores(tmp_path, capsys, damage):
    d = _saved(tmp_path)
    step2 = d / "2"
    _truncate(
        *{  # the array data files (OCDBT 'd/' folders; which one is read depends on the layout), or JSON
            "state_array": [p for p in step2.rglob("*") if p.is_file() and p.parent.name == "d"],
            "state_metadata": [step2 / "state" / "_METADATA"],
            "data_metadata": [step2 / "data" / "metadata"],
        }[damage]
    )
    before = {p.relative_to(step2): p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    with checkpoint.Checkpointer(d) as ck:
        state, data, _ = ck.restore(target=jax.tree.map(jnp.zeros_like, _state(1)), fallback=True)
        assert data == {"offset": 1} and int(state["step"]) == 1
        np.testing.assert_array_equal(state["w"], _state(1)["w"])
        assert ck.all_steps() == [1]
    (moved,) = [p for p in d.iterdir() if p.name.startswith("2.damaged-")]
    assert not (d / "2").exists()
    after = {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()}
    assert after == before  # moved, not deleted or altered
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "is damaged" in x]
    assert str(d / "2") in line and moved.name in line and "restored step 1" in line
    with checkpoint.Checkpointer(d, async_save=False) as ck:  # training goes on: step 2 is written again
        ck.save(2, _state(2), {"offset": 2}, META)
        assert ck.all_steps() == [1, 2]


def test_a_changed_model_moves_nothing(tmp_path):
    """A target that fits no step (another model) is not damage: every step stays, one error names it."""
    d = _saved(tmp_path)
    wrong = {"step": jnp.asarray(0), "w": jnp.zeros((7,))}
    with checkpoint.Checkpointer(d) as ck:
        with pytest.raises(checkpoint.CheckpointError, match=f"{d / '2'}.*restore_meta"):
            ck.restore(target=wrong, fallback=True)
        assert ck.all_steps() == [1, 2]
    assert sorted(p.name for p in d.iterdir()) == ["1", "2"]


def test_only_step_damaged_raises_one_line_and_keeps_it(tmp_path):
    d = _saved(tmp_path, steps=(1,))
    (d / "1" / "data" / "metadata").write_text('{"offs')
    with checkpoint.Checkpointer(d) as ck:
        with pytest.raises(checkpoint.CheckpointError) as e:
            ck.restore(target=jax.tree.map(jnp.zeros_like, _state(1)), fallback=True)
    assert "\n" not in str(e.value) and "1.damaged" in str(e.value)
    assert (d / "1").exists()


def test_readers_without_fallback_move_nothing(tmp_path):
    """Tools and a finished phase's final state (restore without fallback) raise on damage; restore_meta
    reads the newest metadata that parses; neither moves a folder."""
    d = _saved(tmp_path)
    (d / "2" / "data" / "metadata").write_text("")
    (d / "2" / "meta" / "metadata").write_text("{")
    with checkpoint.Checkpointer(d) as ck:
        with pytest.raises(checkpoint.CheckpointError, match="damaged"):
            ck.restore(target=jax.tree.map(jnp.zeros_like, _state(1)))
        assert ck.restore_meta() == META
    assert sorted(p.name for p in d.iterdir()) == ["1", "2"]


@pytest.fixture
def small_disk(tmp_path):
    yield from common.small_disk(tmp_path / "disk", "2m")


def test_failed_async_save_is_raised_at_the_next_check(small_disk):
    ckdir = small_disk / "ckpt"
    ck = checkpoint.Checkpointer(ckdir, keep=5, async_save=True)
    ck.save(1, _state(1), {"offset": 1}, META)
    ck.wait()
    ck.save(2, _state(2, n=1_000_000), {"offset": 2}, META)  # 4 MB of random floats: does not fit
    with pytest.raises(checkpoint.SaveFailed) as e:
        for _ in range(400):  # the loop calls check() once a step; the write fails within ms
            ck.check()
            jax.numpy.zeros(()).block_until_ready()
            import time

            time.sleep(0.01)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(ckdir / "2") in msg and "No space left on device" in msg
    assert "last committed step is 1" in msg
    assert ck.all_steps() == [1]  # the half-written step is never a candidate
    shutil.rmtree(ckdir / "2.orbax-checkpoint-tmp", ignore_errors=True)
    state, data, _ = checkpoint.Checkpointer(ckdir).restore()
    assert data == {"offset": 1}
