"""The slot protocol (voltron_jax/registry.py): every registered class implements its slot's interface
with the protocol's signatures, and every slot's module runs eagerly on NumPy inputs."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from voltron_jax import config as cfglib
from voltron_jax import registry
from voltron_jax.models import decoder

ENTRIES = [(slot, name) for slot, table in registry.TABLES.items() for name in table]


@pytest.mark.parametrize("slot,name", ENTRIES)
def test_every_registered_class_conforms_to_its_slot_protocol(slot, name):
    cls = registry.get(slot, name)
    assert registry.conformance_errors(slot, cls) == []
    # the uniform hooks run on a real config and give the declared types
    c = _config(slot, name)
    assert isinstance(cls.from_config(c.model), dict)
    assert isinstance(cls.flops_per_token(c.model, c.data.seq_len), float)
    assert cls.validate(c) is None


def test_conformance_check_reads_signatures_not_names():
    class Old(nn.Module):  # the pre-protocol shapes: flops by matmul shape, period an int attribute
        features: int
        kernel_axes: tuple = ()
        init_std: float = 0.02
        dtype: object = None
        period = 1

        def __call__(self, x):
            return x

        @staticmethod
        def from_config(m, **ctx) -> dict:
            return {}

        @staticmethod
        def flops_per_token(n_in, n_out) -> float:
            return 0.0

        def validate(self, config) -> None:  # not static
            return None

    errors = registry.conformance_errors("linear", Old)
    assert any("flops_per_token" in e for e in errors) and any("validate" in e for e in errors)
    assert any("from_config" in e for e in errors)  # an extra **ctx is not the protocol's signature
    errors = registry.conformance_errors("routing", Old)
    assert any("period_of is missing" in e for e in errors) and any("wrap is missing" in e for e in errors)

    class NoField(nn.Module):
        d_ff: int

        def __call__(self, x, extra):  # an extra parameter without a default
            return x

    errors = registry.conformance_errors("ffn", NoField)
    assert any("no field 'linear'" in e for e in errors) and any("__call__" in e for e in errors)


# --------------------------------------------------------------------------------------------- NumPy


def _config(slot: str, name: str, scan: bool = False):
    c = cfglib.get_default()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, scan_layers=scan)
    c.data.seq_len = 16
    c.model[slot] = name
    if name == "infini":
        c.model.infini.segment_len = 8
    if name == "mod":
        c.model.mod.update(every=2, capacity=0.5)
    if name == "denseformer":
        c.model.denseformer.update(dilation=1, period=1)
    for sub in ("moe", "moa"):
        c.model[sub].update(n_experts=2, top_k=1)
    cfglib.validate(c)
    return c


def _inputs(c):
    b, t, m = 2, c.data.seq_len, c.model
    rng = np.random.default_rng(0)
    k = decoder.head_dim(m)
    x = rng.standard_normal((b, t, m.d_model)).astype(np.float32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    q = rng.standard_normal((b, t, m.n_heads, k)).astype(np.float32)
    kv = rng.standard_normal((b, t, m.n_kv_heads, k)).astype(np.float32)
    return x, pos, q, kv


def _eager(module, *args):
    """init and apply outside jit on NumPy arguments; the output is finite."""
    variables = nn.unbox(module.init(jax.random.key(0), *args))
    out = module.apply(variables, *args)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(out))
    return out


# The slots whose eager (op-by-op) init and apply take seconds: `make test` (slow), not test-fast.
SLOW_EAGER = {
    ("attention", "moa"),
    ("ffn", "moe"),
    ("linear", "bitlinear"),
    ("memory", "infini"),
    ("routing", "mod"),
}


@pytest.mark.parametrize(
    "slot,name,scan",
    [
        pytest.param(s, n, False, marks=pytest.mark.slow) if (s, n) in SLOW_EAGER else (s, n, False)
        for s, n in ENTRIES
    ]
    + [pytest.param("residual", "denseformer", True, marks=pytest.mark.slow)],
)
def test_every_slot_module_accepts_numpy_inputs_eagerly(slot, name, scan):
    c = _config(slot, name, scan)
    parts = decoder.build_parts(c.model)
    x, pos, q, kv = _inputs(c)
    if slot == "linear":
        y = _eager(parts["linear"](8, ("embed", "mlp")), x)
        assert y.shape == x.shape[:2] + (8,)
    elif slot == "memory":
        assert _eager(parts["memory"](), q, kv, kv, pos).shape == q.shape
    elif slot in ("attention", "residual"):
        make = parts["stack"] if slot == "residual" else parts["attention"]
        assert _eager(make(), x, pos).shape == x.shape
    elif slot == "ffn":
        assert _eager(parts["ffn"](), x).shape == x.shape
    else:  # routing: every layer as the routing slot wraps it (MoD: layer 1 is routed)
        for make in parts["layers"]:
            assert _eager(make(), x, pos).shape == x.shape
    ids = np.ones((2, c.data.seq_len), np.int32)
    assert _eager(decoder.build_model(c.model), ids).shape == (2, c.data.seq_len, c.model.vocab_size)


@pytest.mark.slow
def test_numpy_inputs_give_the_jax_outputs():
    """The NumPy path is the jax path (MoE, MoD, scanned DenseFormer): same params, same outputs."""
    import jax.numpy as jnp

    for slot, name, scan in (
        ("ffn", "moe", False),
        ("routing", "mod", False),
        ("residual", "denseformer", True),
    ):
        c = _config(slot, name, scan)
        x, pos, _, _ = _inputs(c)
        parts = decoder.build_parts(c.model)
        module = {"ffn": parts["ffn"], "routing": parts["layers"][1], "residual": parts["stack"]}[slot]()
        args = (x,) if slot == "ffn" else (x, pos)
        v = nn.unbox(module.init(jax.random.key(1), *args))
        want = jax.jit(module.apply)(v, *map(jnp.asarray, args))
        np.testing.assert_allclose(module.apply(v, *args), want, rtol=1e-5, atol=1e-5)
