"""AOT compilation for TPU topologies on this CPU host (libtpu), the splash attention path, 13B configs."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import tiny, voltron_13b
from voltron_jax.models import attention, decoder, splash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("libtpu")
spec = importlib.util.spec_from_file_location("aot_compile", os.path.join(ROOT, "launch", "aot_compile.py"))
aot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aot)


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_tpu_topology():
    c = tiny.get_config("test")
    r = aot.compile_step(c, "v4:2x2x1", step_time=0.5)
    # a v4 VM runs megacore: one JAX device per chip with the chip's HBM (libtpu reports 30.75 GiB)
    assert r["fits"] and r["devices"] == 4 and r["device_kind"] == "TPU v4" and r["chip_config"] == "megacore"
    assert 30 * 2**30 < r["hbm_bytes"] < 32 * 2**30
    assert r["arguments"] > 0 and r["outputs"] > 0 and r["total"] < r["hbm_bytes"]
    assert r["arguments"] <= r["heap"] < r["hbm_bytes"]  # the heap holds the parameters and temporaries
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}
    assert r["params_analytic"]["total"] <= r["params"] < 1.05 * r["params_analytic"]["total"]
    assert r["flops_per_step"] == pytest.approx(3 * decoder.flops_per_token(c.model, 64) * 8 * 64)
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / 0.5 / (4 * 275e12))  # 4 chips
    assert "FITS" in aot.render(r)


def test_a_compiled_step_over_the_hbm_does_not_fit():
    """The verdict uses libtpu's heap (buffer assignment) when the compile dumped one, else the memory
    analysis sum; either over the HBM does not fit, whatever the compiler accepted."""
    gib = 2**30
    mem = dict(fits=True, arguments=1.24 * gib, outputs=1.24 * gib, aliased=1.24 * gib, code=0.1 * gib)
    over = aot.judge(dict(mem, temporaries=18.95 * gib, hbm_bytes=15.25 * gib))
    assert not over["fits"] and "memory analysis needs 20.29 GiB per device of 15.25 GiB" in over["error"]
    assert aot.judge(dict(mem, temporaries=10 * gib, hbm_bytes=15.25 * gib))["fits"]
    heap_in = aot.judge(dict(mem, temporaries=18.95 * gib, heap=14 * gib, hbm_bytes=15.25 * gib))
    assert heap_in["fits"] and heap_in["total"] > heap_in["hbm_bytes"]  # the sum is only an upper bound
    heap_out = aot.judge(dict(mem, temporaries=10 * gib, heap=16 * gib, hbm_bytes=15.25 * gib))
    assert not heap_out["fits"] and "buffer assignment needs 16.00 GiB" in heap_out["error"]


@pytest.mark.slow
def test_splash_kernel_compiles_forward_and_backward_for_tpu():
    """On a TPU mesh 'auto' lowers both attention paths (plain core and Infini's segment-local attention)
    to the Mosaic splash kernel, sharded over batch and heads, and the train step compiles."""
    c = tiny.get_config("test")
    c.model.update(attention_impl="auto", memory="infini", head_dim=128, n_heads=4, n_kv_heads=2)
    c.model.infini.segment_len = 128
    c.data.seq_len, c.data.batch_size = 256, 4
    c.mesh.update(data=2, tensor=2)
    devices = aot.topology_devices("v5e:2x2")
    phase = aot.select_phase(c, "")
    from voltron_jax import train

    rt = train.Runtime(phase, devices=devices)

    from voltron_jax import sharding

    with sharding.context(rt.mesh):
        lowered = rt.train_step.lower(rt.abstract, aot.abstract_batch(c, rt.mesh))
    hlo = lowered.as_text()
    kernels = set(re.findall(r'kernel_name = "([^"]+)"', hlo))
    assert {f"splash_mha_{k}" for k in ("fwd_residuals", "dq_no_residuals", "dkv_no_residuals")} <= kernels
    assert "sdy.manual_computation" in hlo  # inside shard_map: Mosaic kernels cannot be auto-partitioned
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    # For this step (Mosaic kernels inside) libtpu's temporaries hold the donated train state
    # (launch/aot_compile.judge, benchmarks/aot_memory_accounting.py) and the gradients, all live at once
    # for the global-norm clip: 7.3 MB >= 2.5 MB here. (The same step with attention_impl='xla' reports 0
    # temporaries on this libtpu; aot_compile's verdict reads the buffer assignment's heap instead.)
    state, grads = _bytes_per_device(rt.abstract), _bytes_per_device(rt.abstract.params)
    # fp32 activations a layer keeps for the backward pass, per device (batch over data, heads over
    # tensor): [b,t] x (5 D-wide: residuals, norms' in/out; 2 H*K: q, attention out; 2 G*K: k, v; 3 F:
    # gate, up, their product) + Infini's [b,G,K,K] memory per segment; plus the logits' [b,t,V] x 3
    b, t, m = 4 // 2, 256, c.model
    per_layer = 4 * b * t * (5 * m.d_model + 2 * (4 // 2) * 128 + 2 * (2 // 2) * 128 + 3 * m.d_ff // 2)
    per_layer += 4 * b * (t // 128) * (2 // 2) * 128 * 128
    activations = m.n_layers * per_layer + 3 * 4 * b * t * m.vocab_size
    # below: the state or the gradients are not in the figure; above (9.9 MB here): the step keeps more
    # than that analytic estimate. Measured, not caught: the batch unsharded (data=1 on 2 devices) gives
    # 8.4 MB.
    assert state + grads <= temp <= state + grads + activations, (temp, state, grads, activations)


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded jax.ShapeDtypeStructs."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def test_chip_configs():
    """auto = what a TPU VM of the type presents: megacore on v4 (4 devices for 4 chips), libtpu's default
    elsewhere; libtpu's default on v4 is one device per TensorCore."""
    assert len(aot.topology_devices("v4:2x2x1")) == 4
    assert len(aot.topology_devices("v4:2x2x1", "default")) == 8
    assert aot.chip_config_for("v5p:2x2x1") == "default" and aot.chip_config_for("v4:4x4x4") == "megacore"
    with pytest.raises(aot.TopologyError, match="--chip_config='mega' is not one of auto"):
        aot.topology_devices("v4:2x2x1", "mega")


# (name, slices) -> (wraparound per axis, chips per host, host bounds) of the slice a TPU VM presents:
# whole 4x4x4 cubes of v4/v5p are tori on every axis, smaller slices are not; a v5e axis wraps at 16 chips.
SLICES = {
    ("v4:2x2x1", 1): ((False, False, False), (2, 2, 1), (1, 1, 1)),
    ("v4:2x4x4", 1): ((False, False, False), (2, 2, 1), (1, 2, 4)),
    ("v4:4x4x4", 1): ((True, True, True), (2, 2, 1), (2, 2, 4)),
    ("v5p:2x2x1", 1): ((False, False, False), (2, 2, 1), (1, 1, 1)),
    ("v5p:4x4x4", 1): ((True, True, True), (2, 2, 1), (2, 2, 4)),
    ("v5p:4x4x8", 1): ((True, True, True), (2, 2, 1), (2, 2, 8)),
    ("v5e:2x2", 1): ((False, False, False), (2, 2, 1), (1, 1, 1)),
    ("v5e:8x16", 1): ((False, True, False), (2, 2, 1), (4, 8, 1)),
    ("v5e:16x16", 1): ((True, True, False), (2, 2, 1), (8, 8, 1)),
    ("v5p:4x4x4", 2): ((True, True, True), (2, 2, 1), (2, 2, 4)),
    ("v4:4x4x4", 2): ((True, True, True), (2, 2, 1), (2, 2, 4)),
}


@pytest.mark.parametrize("name,slices", sorted(SLICES))
def test_topology_descriptor_matches_what_libtpu_compiles_for(name, slices):
    """The descriptor of each named slice (wraparound links, chips per host, slices) is what libtpu's own
    topology description holds when it compiles for the devices (the TpuPjRtTopologyDescriptionProto it
    dumps), and what the devices report (chip coordinates, processes, slice_index)."""
    wrap, per_host, hosts = SLICES[name, slices]
    topo = aot.describe(name, num_slices=slices)
    assert (topo.wrap, topo.chips_per_host_bounds, topo.host_bounds) == (wrap, per_host, hosts)
    devices = aot.topology_devices(name, num_slices=slices)
    libtpu = aot.libtpu_topology(devices)
    assert libtpu == dict(
        chip_config=topo.chip_config, chips_per_host_bounds=per_host, host_bounds=hosts, wrap=wrap
    )
    q = aot.query(devices)
    assert q["chip_bounds"] == topo.shape and q["chips_per_host_bounds"] == per_host
    assert q["slices"] == slices and q["processes"] == slices * math.prod(hosts)
    assert q["chips"] == slices * aot.chips(name) and q["devices_per_chip"] == 1


def test_libtpu_alone_builds_a_torus_slice_without_wraparound():
    """Why the descriptor passes wrap: given only the name, libtpu compiles for v5p-128 and v4-128 as
    meshes without wraparound links, which no TPU VM of those slices is."""
    from jax.experimental import topologies

    for name, kw in (("v5p:4x4x4", {}), ("v4:4x4x4", dict(chip_config_name="megacore"))):
        bare = topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices
        assert aot.libtpu_topology(list(bare))["wrap"] == (False, False, False)
        assert aot.libtpu_topology(aot.topology_devices(name))["wrap"] == (True, True, True)


def test_a_two_slice_mesh_puts_only_data_across_slices():
    """With mesh.dcn_data=2 over two v5p-128 slices, each slice holds a whole fsdp sub-mesh and only the
    data axis crosses slices; a mismatch between dcn_data and the devices' slices is one clear error."""
    from voltron_jax import sharding
    from voltron_jax.config import ConfigError

    devices = aot.topology_devices("v5p:4x4x4", num_slices=2)
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=1, expert=1, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 64, "tensor": 1, "expert": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ConfigError, match="mesh.dcn_data=1 but the devices span 2 slice"):
        sharding.make_mesh(dict(data=2, fsdp=-1, tensor=1, expert=1), devices)
    with pytest.raises(ConfigError, match="must be >= 1 and divide mesh.data=1"):
        sharding.resolve_mesh(dict(data=1, fsdp=-1, tensor=1, expert=1, dcn_data=2), 128)


@pytest.mark.slow
def test_unknown_topology_is_one_clear_error():
    with pytest.raises(aot.TopologyError, match="unknown TPU topology 'v9:2x2'"):
        aot.topology_devices("v9:2x2")
    with pytest.raises(aot.TopologyError, match="not of the form"):
        aot.topology_devices("v4-128")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "aot_compile.py"),
            "--config=configs/tiny.py:test",
            "--topology=v4:3x3x3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().startswith("error: unknown TPU topology 'v4:3x3x3'")
    assert out.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_splash_equals_xla_attention_on_cpu():
    """The splash path (Pallas interpret mode here) is the XLA path: causal, GQA, documents, invalid keys,
    values and gradients, sharded over a data x tensor mesh."""
    b, t, h, g, k = 2, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, k))
    kk, v = jax.random.normal(keys[1], (b, t, g, k)), jax.random.normal(keys[2], (b, t, g, k))
    seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 78], b, 0))
    valid = jax.random.uniform(keys[3], (b, t)) > 0.2
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2, 1), ("data", "fsdp", "tensor", "expert"))
    w = valid[..., None, None].astype(jnp.float32)  # invalid queries' outputs are unspecified

    def loss(fn, q):
        return jnp.sum(fn(q, kk, v, seg, valid) * w * jnp.cos(jnp.arange(k)))

    ref_fn = lambda *a: attention.causal_attention(*a, impl="xla")
    with mesh:
        got, got_g = jax.jit(
            lambda q: (
                splash.causal_attention(q, kk, v, seg, valid),
                jax.grad(lambda q: loss(splash.causal_attention, q))(q),
            )
        )(q)
    want, want_g = ref_fn(q, kk, v, seg, valid), jax.grad(lambda q: loss(ref_fn, q))(q)
    np.testing.assert_allclose(got * w, want * w, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_g, want_g, atol=1e-5, rtol=1e-5)
    assert not splash.selected("auto", t)  # on CPU 'auto' keeps XLA


@pytest.mark.slow
def test_13b_configs_count_13b_and_87b_parameters():
    """The seed has ~13.0B parameters and the c-BTX MoE+MoA ~87.2B, 23.6B active (eval_shape, every leaf); the
    analytic backbone count agrees to 0.1% (the rest are norms, routers' predictors, DWA, gates)."""
    counts = {}
    for variant in ("v4", "moe,v4"):
        c = voltron_13b.get_config(variant)
        model = decoder.build_model(c.model)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32))
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
        analytic = aot.param_counts(c.model)
        assert analytic["total"] <= n < 1.001 * analytic["total"]
        counts[variant] = n, analytic["active"]
    assert 12.9e9 < counts["v4"][0] < 13.1e9
    assert 87.0e9 < counts["moe,v4"][0] < 87.4e9 and 23.4e9 < counts["moe,v4"][1] < 23.8e9  # top-2 of 8


def test_estimate_extrapolates_two_depths():
    """--estimate's arithmetic: per-block cost = the difference of two depths, the rest = the shallow
    compile minus its blocks; figures that cannot be extrapolated give no estimate, with the reason."""
    e = aot.extrapolate({2: 5.0, 1: 3.0}, 20)
    assert (e["per_block_s"], e["base_s"], e["step_s"], e["valid"]) == (2.0, 1.0, 41.0, True)
    assert aot.extrapolate({2: 1.0, 4: 2.0}, 40)["step_s"] == pytest.approx(20.0)
    neg = aot.extrapolate({1: 0.5, 2: -0.3}, 20)
    assert not neg["valid"] and "optimal_seconds is -0.3 at 2 blocks" in neg["why"]
    flat = aot.extrapolate({1: 0.5, 2: 0.4}, 20)
    assert not flat["valid"] and "not slower" in flat["why"]
    with pytest.raises(ValueError, match="two different depths"):
        aot.extrapolate({1: 0.5}, 20)
    one = aot.extrapolate({2: 5.0}, 20, rest=1.0)  # one depth and another model's rest
    assert (one["per_block_s"], one["base_s"], one["step_s"], one["valid"]) == (2.0, 1.0, 41.0, True)
    assert not aot.extrapolate({1: 0.9}, 20, rest=1.0)["valid"]


@pytest.mark.slow
def test_estimate_runs_on_a_tiny_config(tmp_path):
    """--estimate compiles the step unrolled at 1 and 2 super-blocks for a TPU topology and reports the
    compiler's cost-model time: the 2-layer model's extrapolated step is its own 2-block compile's; with
    --dump_dir each depth's HLO is kept."""
    c = tiny.get_config("test")
    c.model.update(n_layers=2, d_model=64, d_ff=128, n_heads=2, n_kv_heads=2)
    c.data.update(seq_len=32, batch_size=4)
    e = aot.estimate(c, "v4:2x2x1", log=lambda s: None, dump_dir=str(tmp_path))
    for k in (1, 2):
        assert list((tmp_path / f"depth_{k}").glob("*after_optimizations.txt")), k
    t1, t2 = e["optimal_seconds"]["1"], e["optimal_seconds"]["2"]
    assert e["valid"] and 0 < t1 < t2 and e["super_block"] == 1 and e["n_blocks"] == 2
    assert e["step_s"] == pytest.approx(t2)
    assert e["tokens_per_s_per_chip"] == pytest.approx(4 * 32 / t2 / 4)
    assert e["mfu"] == pytest.approx(3 * decoder.flops_per_token(c.model, 32) * 4 * 32 / t2 / (4 * 275e12))
    text = aot.render_estimate(e)
    assert text.startswith("COMPILER COST-MODEL ESTIMATE") and "not a measurement" in text
    # the per-slice cost model: flops and bytes per depth and per block, the block's ops by class
    assert 0 < e["cost"]["1"]["flops"] < e["cost"]["2"]["flops"]
    assert e["cost_per_block"]["flops"] == pytest.approx(e["cost"]["2"]["flops"] - e["cost"]["1"]["flops"])
    per = e["ops_per_block"]
    assert per["classes"]["matmul"] > 0 and any(k.startswith("matmul | bwd") for k in per["labels"])
    assert "cycles by op class: " in text and "costliest ops" in text
