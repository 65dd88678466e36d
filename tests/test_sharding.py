"""The sharding context: activation constraints only exist when JAX reports a current mesh.

Found late: every `nn.with_logical_constraint` of the model was a silent no-op because the train loop traced
under the legacy `with mesh:`, which jax no longer reports as the current mesh; GSPMD then picked the
activations' layouts alone (on a v4 pod: the batch replicated, 51 GiB per core for the 13B MoE)."""

import jax
import numpy as np
from etils import epath
from flax.core import meta

from configs import tiny
from voltron_jax import sharding, train


def test_context_defines_the_mesh_flax_constrains_against():
    mesh = sharding.make_mesh(tiny.get_config("test").mesh)
    assert not meta.global_mesh_defined()
    with mesh:  # the legacy context: flax sees no mesh, constraints would vanish
        assert not meta.global_mesh_defined()
    with sharding.context(mesh):
        assert meta.global_mesh_defined()
        assert jax.sharding.get_abstract_mesh().shape == mesh.shape


def test_train_step_carries_the_activation_constraints(tmp_path):
    """The Runtime's train step holds the model's activation constraints however it is called (the loop
    calls it outside any mesh context)."""
    c = tiny.get_config("test")
    c.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
    c.data.batch_size = 4
    phase = train.phases(c, epath.Path(tmp_path))[0]
    rt = train.Runtime(phase)
    batch = {
        k: jax.ShapeDtypeStruct((4, c.data.seq_len), np.int32 if k != "weights" else np.float32)
        for k in ("inputs", "targets", "positions", "segment_ids", "weights")
    }
    text = rt.train_step.lower(rt.abstract, batch).as_text()  # outside any context, as the loop calls it
    n = text.count("sharding_constraint") + text.count("@Sharding")
    assert n >= c.model.n_layers, n  # at least one per block boundary


def test_weights_without_an_expert_dim_shard_over_the_expert_axis_too():
    """On an fsdp x expert mesh, a weight with no expert dim (embeddings, the K/V every MoA expert shares)
    splits 'embed' over fsdp x expert, every device; an expert weight keeps 'expert' on its expert dim and
    'embed' over fsdp. A dim fsdp x expert does not divide keeps fsdp; with expert=1 the spec is as before."""
    from jax.sharding import PartitionSpec as P

    from voltron_jax import config as cfglib

    cfg = cfglib.get_default().mesh
    cfg.data, cfg.fsdp, cfg.tensor, cfg.expert = 1, 2, 1, 4
    mesh = sharding.make_mesh(cfg)
    kv = sharding.fit_spec(sharding.logical_to_spec(("embed", "kv_heads")), (64, 32), mesh)
    assert kv == P(("fsdp", "expert"), "tensor")
    gate = sharding.fit_spec(sharding.logical_to_spec(("expert", "embed", "mlp")), (4, 64, 96), mesh)
    assert gate == P("expert", "fsdp", "tensor")
    assert sharding.fit_spec(kv, (6, 32), mesh) == P("fsdp", "tensor")  # 6 % 8 != 0, 6 % 2 == 0
    cfg.fsdp, cfg.expert = 8, 1
    assert sharding.fit_spec(kv, (64, 32), sharding.make_mesh(cfg)) == P("fsdp", "tensor")
