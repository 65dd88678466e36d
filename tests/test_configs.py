"""Every config builds and validates; command-line overrides reach the model; bad input fails clearly."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, tiny
from voltron_jax.models import decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    f
    for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(f) not in ("common.py", "__init__.py")
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


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_builds_and_validates(path):
    mod = _load(path)
    for variant in getattr(mod, "VARIANTS", {"": None}):
        c = mod.get_config(variant)
        common.validate(c)
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
    with pytest.raises(common.ConfigError, match=match):
        common.validate(c)


def test_impossible_mesh_and_batch():
    c = tiny.get_config()
    c.mesh.update(data=3, fsdp=1, tensor=1, expert=1)
    with pytest.raises(common.ConfigError, match="product is 8|8 are present"):
        common.validate(c, n_devices=8)
    c.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(common.ConfigError, match="only one axis"):
        common.validate(c, n_devices=8)
    c = tiny.get_config()
    c.data.batch_size = 12
    with pytest.raises(common.ConfigError, match="batch_size=12 is not divisible"):
        common.validate(c, n_devices=8)
    assert common.resolve_mesh(tiny.get_config().mesh, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}


def test_schedule_must_agree_with_phases():
    c = tiny.get_config()
    c.schedule.warmup = c.recipe.stable.steps + 1
    with pytest.raises(common.ConfigError, match="warmup"):
        common.validate(c)
    c = tiny.get_config()
    c.schedule.name = "cosine"
    with pytest.raises(common.ConfigError, match="stage='decay'"):
        common.validate(c)


def test_recipe_errors():
    c = tiny.get_config()
    c.recipe.decay.init.from_ = "nope"
    with pytest.raises(common.ConfigError, match="unknown phase 'nope'"):
        common.validate(c)
    c = tiny.get_config()
    c.recipe.decay.mixture = "web"
    with pytest.raises(common.ConfigError, match="mixture='web'"):
        common.validate(c)
    c = tiny.get_config()
    c.recipe.decay.overrides = "model.dmodel=3"
    with pytest.raises(common.ConfigError, match="unknown field 'dmodel'"):
        common.validate(c)


def test_phase_order_start_and_overrides():
    c = tiny.get_config()
    assert common.phase_order(c.recipe) == ["stable", "decay"]
    assert common.phase_start(c.recipe, "decay") == c.recipe.stable.steps
    assert common.phase_start(c.recipe, "decay", max_steps=3) == 3
    o = common.apply_overrides(c, "model.ffn=moe,model.tie_embeddings=true,optim.lr=0.5")
    assert (o.model.ffn, o.model.tie_embeddings, o.optim.lr) == ("moe", True, 0.5)
    assert c.model.ffn == "mlp"  # the original is untouched
