"""Adding a technique edits one place (docs/design.md, "Adding a technique"): a toy FFN registered from this
file, not from the library, gets its config sub-dict, aux-loss weight, resume rule, report metric,
optimizer group and sharding rule from its own class attributes, and trains through the one loop."""

import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax import optim, registry, sharding, train
from voltron_jax.models.layers import Dense, param_with_axes
from voltron_jax.run import report, resume


class ToyFFN(nn.Module):
    """x [B,T,D] -> [B,T,D]: a gated ReLU FFN with a per-channel gain; sows a toy aux loss and a rate."""

    d_ff: int
    linear: Any = Dense
    gain_init: float = 1.0

    CONFIG_KEY = "toy_ffn"
    DEFAULTS = dict(gain_init=1.0, impl="fast", aux="on")
    AUX_LOSSES = dict(toy_aux=0.5)
    RUNTIME_FIELDS = ("impl",)
    METRICS = dict(toy_rate="Toy")
    PARAM_GROUPS = ((("ffn", "toy_gain"), "gate"),)
    SHARDING_RULES = (("toy_hidden", "tensor"),)

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = jax.nn.relu(self.linear(self.d_ff, ("embed", "toy_hidden"), name="up")(x))  # [B,T,F]
        gain = param_with_axes(self, "toy_gain", nn.initializers.constant(self.gain_init), (d,), ("norm",))
        self.sow("aux_loss", "toy_aux", jnp.mean(jnp.square(h)) * 1e-3)
        self.sow("stats", "toy_rate", jnp.mean((h > 0).astype(jnp.float32)))
        return self.linear(d, ("toy_hidden", "embed"), name="down")(h) * gain  # [B,T,D]

    @staticmethod
    def from_config(m) -> dict:
        return dict(gain_init=m.toy_ffn.gain_init)

    @staticmethod
    def validate(config) -> None:
        if config.model.toy_ffn.gain_init <= 0:
            raise cfglib.ConfigError("model.toy_ffn.gain_init must be > 0.")

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        return 2 * 2.0 * m.d_model * m.d_ff


@pytest.fixture
def toy():
    registry.register("ffn", "toy", ToyFFN)
    try:
        yield
    finally:
        registry.unregister("ffn", "toy")


def test_a_class_that_does_not_implement_its_slot_is_refused():
    class NotAnFFN(nn.Module):
        def __call__(self, x):
            return x

    with pytest.raises(ValueError, match="does not implement the ffn slot"):
        registry.register("ffn", "broken", NotAnFFN)
    with pytest.raises(ValueError, match="registered already"):
        registry.register("ffn", "mlp", ToyFFN)
    assert "broken" not in registry.choices("ffn")


def test_the_declarations_reach_config_resume_report_optimizer_and_sharding(toy):
    c = cfglib.get_default()
    assert c.model.toy_ffn.to_dict() == ToyFFN.DEFAULTS
    assert c.aux_weights.toy_aux == 0.5
    assert not resume.guarded("model.toy_ffn.impl") and resume.guarded("model.toy_ffn.gain_init")
    assert report.drop_metrics()["toy_rate"] == "Toy"
    assert ("toy_hidden", "tensor") in sharding.rules()
    c = tiny.get_config("test")
    c.model.ffn = "toy"
    c.model.toy_ffn.gain_init = -1.0
    with pytest.raises(cfglib.ConfigError, match="gain_init"):  # its own validate runs
        cfglib.validate(c)


@pytest.mark.slow
def test_a_toy_slot_trains_two_steps_with_nothing_else_edited(toy, tmp_path):
    c = tiny.get_config("test")
    c.model.ffn = "toy"
    c.mesh.tensor, c.mesh.data = 2, -1
    c.max_steps = 2
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 2, 2
    train.run(c, str(tmp_path))
    records = [
        json.loads(line) for line in (tmp_path / "00_stable" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps][-1] == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(0.0 < r["toy_rate"] <= 1.0 for r in steps)  # its sown stat reaches the metrics

    rt = train.Runtime(train.phases(c, tmp_path)[0])
    params = rt.abstract.params
    labels = jax.tree_util.tree_flatten_with_path(optim.param_labels(params, c.model))[0]
    gains = {optim.path_names(p)[-1]: lab for p, lab in labels if optim.path_names(p)[-1] == "toy_gain"}
    assert gains == {"toy_gain": "gate"}  # its optimizer group
    specs = jax.tree_util.tree_flatten_with_path(rt.shardings.params)[0]
    up = [s.spec for p, s in specs if {"ffn", "up"} <= set(optim.path_names(p))]
    assert up and all(spec[-1] == "tensor" for spec in up)  # its sharding rule: the hidden dim over tensor
