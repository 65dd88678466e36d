"""Every config builds and validates; command-line overrides reach the model; bad input fails clearly."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import tiny, voltron_13b
from voltron_jax import config as cfglib
from voltron_jax import recipe, sharding
from voltron_jax.models import decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    f for f in glob.glob(os.path.join(ROOT, "configs", "*.py")) if os.path.basename(f) != "__init__.py"
)


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse(*args):
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


# Configs with many variants or deep models take seconds each to trace: `make test` (slow), not test-fast.
SLOW_CONFIGS = ("bench_1b.py", "recipe_tiny.py", "tiny_deep.py", "tiny_mod.py", "voltron_13b.py")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f, marks=pytest.mark.slow) if os.path.basename(f) in SLOW_CONFIGS else f
        for f in CONFIG_FILES
    ],
    ids=os.path.basename,
)
def test_every_config_builds_and_validates(path):
    mod = _load(path)
    for variant in getattr(mod, "VARIANTS", {"": None}):
        c = mod.get_config(variant)
        cfglib.validate(c)
        model = decoder.build_model(c.model)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32))
        assert shapes["params"], (path, variant)


def test_overrides_reach_the_model():
    c = _parse(
        "--config=configs/tiny.py:test",
        "--config.model.d_model=96",
        "--config.model.n_heads=3",
        "--config.model.n_kv_heads=3",
        "--config.max_steps=3",
    )
    assert c.model.d_model == 96 and c.max_steps == 3
    params = jax.eval_shape(
        decoder.build_model(c.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
    )
    assert params["params"]["embed"]["embedding"].value.shape == (c.model.vocab_size, 96)


def test_unknown_key_fails_at_parse_time():
    with pytest.raises(Exception, match="dmodel"):
        _parse("--config=configs/tiny.py", "--config.model.dmodel=3")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("linear", "ternary", "dense.*bitlinear"),
        ("attention", "flash", "mha.*moa"),
        ("memory", "rmt", "none.*infini"),
        ("ffn", "swiglu", "mlp.*moe"),
        ("residual", "dense", "plain.*denseformer"),
        ("routing", "mor", "none.*mod"),
    ],
)
def test_unknown_technique_names_the_valid_choices(field, value, match):
    c = tiny.get_config()
    c.model[field] = value
    with pytest.raises(cfglib.ConfigError, match=match):
        cfglib.validate(c)


def test_impossible_mesh_and_batch():
    c = tiny.get_config()
    c.mesh.update(data=3, fsdp=1, tensor=1, expert=1)
    with pytest.raises(cfglib.ConfigError, match="product is 8|8 are present"):
        cfglib.validate(c, n_devices=8)
    c.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(cfglib.ConfigError, match="only one axis"):
        cfglib.validate(c, n_devices=8)
    c = tiny.get_config()
    c.data.batch_size = 12
    with pytest.raises(cfglib.ConfigError, match="batch_size=12 is not divisible"):
        cfglib.validate(c, n_devices=8)
    assert sharding.resolve_mesh(tiny.get_config().mesh, 8) == {
        "data": 8,
        "fsdp": 1,
        "tensor": 1,
        "expert": 1,
    }


def test_schedule_must_agree_with_phases():
    c = tiny.get_config()
    c.schedule.warmup = c.recipe.stable.steps + 1
    with pytest.raises(cfglib.ConfigError, match="warmup"):
        cfglib.validate(c)
    c = tiny.get_config()
    c.schedule.name = "cosine"
    with pytest.raises(cfglib.ConfigError, match="stage='decay'"):
        cfglib.validate(c)


def test_recipe_errors():
    c = tiny.get_config()
    c.recipe.decay.init.from_ = "nope"
    with pytest.raises(cfglib.ConfigError, match="unknown phase 'nope'"):
        cfglib.validate(c)
    c = tiny.get_config()
    c.recipe.decay.mixture = "web"
    with pytest.raises(cfglib.ConfigError, match="mixture='web'"):
        cfglib.validate(c)
    c = tiny.get_config()
    c.recipe.decay.overrides = {"model": {"dmodel": 3}}
    with pytest.raises(cfglib.ConfigError, match="unknown field 'dmodel'"):
        cfglib.validate(c)


def test_phase_order_start_and_overrides():
    c = tiny.get_config()
    assert recipe.phase_order(c.recipe) == ["stable", "decay"]
    assert recipe.phase_start(c.recipe, "decay") == c.recipe.stable.steps
    assert recipe.phase_start(c.recipe, "decay", max_steps=3) == 3
    o = cfglib.apply_overrides(c, {"model.ffn": "moe", "model.tie_embeddings": True, "optim": {"lr": 0.5}})
    assert (o.model.ffn, o.model.tie_embeddings, o.optim.lr) == ("moe", True, 0.5)
    assert c.model.ffn == "mlp"  # the original is untouched


def test_phase_overrides_are_typed_data():
    c = tiny.get_config()
    c.recipe.decay = cfglib.phase(
        4, stage="decay", init_from=["stable"], overrides={"model.moe": {"top_k": 1}, "optim.lr": 1}
    )
    assert c.recipe.decay.overrides.to_dict() == {"model": {"moe": {"top_k": 1}}, "optim": {"lr": 1}}
    o = cfglib.phase_config(c, "decay")
    assert o.model.moe.top_k == 1 and o.optim.lr == 1.0 and isinstance(o.optim.lr, float)
    # values of another type fail with the field's type; sections cannot be replaced by a value
    for bad, match in (
        ({"model.moe.top_k": "2"}, "holds a int"),
        ({"model.tie_embeddings": 1}, "holds a bool"),
        ({"model.moe": 3}, "is a section"),
        ({"recipe.stable.steps": 3}, "cannot change the recipe"),
    ):
        with pytest.raises(cfglib.ConfigError, match=match):
            cfglib.apply_overrides(c, bad)
    # a tuple-valued field takes a tuple (the old "a=b,c=d" strings could not carry one)
    with c.unlocked():
        c.train.extra = (1, 2)
    assert cfglib.apply_overrides(c, {"train.extra": [3, 4, 5]}).train.extra == (3, 4, 5)


def test_phase_overrides_reach_the_command_line():
    c = _parse("--config=configs/recipe_tiny.py:test", "--config.recipe.moe_ft.overrides.model.ffn=mlp")
    assert c.recipe.moe_ft.overrides.model.ffn == "mlp" and c.recipe.mix.overrides.model.ffn == "moe"
    assert cfglib.phase_config(c, "moe_ft").model.ffn == "mlp"


def test_complete_reads_old_string_overrides_and_fills_new_fields():
    c = cfglib.load(os.path.join(ROOT, "configs", "recipe_tiny.py:test"))
    stored = c.to_dict()
    stored["recipe"]["mix"]["overrides"] = "model.ffn=moe,model.attention=moa,model.moe.top_k=1"
    del stored["train"]["keep"]  # a field a newer version added
    done = cfglib.complete(stored)
    assert done.recipe.mix.overrides.to_dict() == {
        "model": {"ffn": "moe", "attention": "moa", "moe": {"top_k": 1}}
    }
    assert done.train.keep == cfglib.get_default().train.keep
    cfglib.validate(done)


def test_config_files_load_by_absolute_path_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cfglib.load(os.path.join(ROOT, "configs", "tiny_bitnet.py:test"))  # builds on its sibling tiny.py
    assert c.model.linear == "bitlinear" and c.model.d_model == 64
    with pytest.raises(cfglib.ConfigError, match="does not exist"):
        cfglib.load("configs/nope.py")


def test_v5p_preset_saves_projections_in_dense_phases_and_keeps_dispatch_remat_for_moe():
    """The v5p preset (95 GiB chips) keeps every projection's output for the backward in the dense phases
    ('dots_no_batch_rotated'); its MoE phases keep their own policy, and the other pods stay at full remat."""
    phases = lambda variant: {  # noqa: E731
        name: cfglib.phase_config(c, name).model.remat
        for c in [voltron_13b.get_config(variant)]
        for name in c.recipe
    }
    assert phases("v5p") == dict(
        stable="dots_no_batch_rotated",
        branch="dots_no_batch_rotated",
        mix="full_save_dispatch",
        moe_ft="full_save_dispatch",
    )
    assert set(phases("plain,v5p").values()) == set(phases("dense,v5p").values()) == {"dots_no_batch_rotated"}
    assert set(phases("moe,v5p").values()) == {"full_save_dispatch"}
    for variant in ("v4", "plain,v4", "plain,v5e", "plain"):
        assert set(phases(variant).values()) == {"full"}, variant
    cfglib.validate(voltron_13b.get_config("plain,v5p"))  # a policy the decoder knows
