"""Slot tables: config choice name -> module class, one plain dict per slot (docs/design.md).

Technique modules are imported lazily so `import voltron_jax.registry` has no side effects and no heavy
imports. Each entry is "module:attribute". A slot class may define

  - `from_config(model_cfg, **ctx) -> dict`   the module fields it takes from the config (<= ~8),
  - `flops_per_token(model_cfg, seq_len) -> float`   forward FLOPs per token of one layer's slot,
  - `validate(config)`   extra checks, raising voltron_jax.errors.ConfigError.
"""

from __future__ import annotations

import importlib

LINEAR = {
    "dense": "voltron_jax.models.layers:Dense",
    "bitlinear": "voltron_jax.models.bitlinear:BitLinear",
}
ATTENTION = {
    "mha": "voltron_jax.models.attention:Attention",
    "moa": "voltron_jax.models.moa:MixtureOfAttention",
}
MEMORY = {
    "none": "voltron_jax.models.attention:CausalCore",
    "infini": "voltron_jax.models.infini_attention:InfiniCore",
}
FFN = {
    "mlp": "voltron_jax.models.layers:MLP",
    "moe": "voltron_jax.models.moe:MoE",
}
RESIDUAL = {
    "plain": "voltron_jax.models.decoder:PlainResidual",
    "denseformer": "voltron_jax.models.denseformer:DenseFormerResidual",
}
ROUTING = {
    "none": "voltron_jax.models.decoder:NoRouting",
    "mod": "voltron_jax.models.mod:MoDRouting",
}
TABLES = {
    "linear": LINEAR,
    "attention": ATTENTION,
    "memory": MEMORY,
    "ffn": FFN,
    "residual": RESIDUAL,
    "routing": ROUTING,
}


def get(slot: str, name: str):
    """The class registered for `name` in `slot`; a clear error for unknown or unbuilt choices."""
    table = TABLES[slot]
    if name not in table:
        raise KeyError(f"model.{slot}={name!r} is unknown; choose one of {sorted(table)}.")
    module, attr = table[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise NotImplementedError(
            f"model.{slot}={name!r} is registered but {table[name]} cannot be loaded ({e})."
        ) from e


def selected(model_cfg) -> dict:
    """{slot: class} for the choices in a model config."""
    return {slot: get(slot, model_cfg[slot]) for slot in TABLES}


def validate_slots(config) -> None:
    """Run each selected slot's own `validate(config)`, if it has one."""
    for cls in selected(config.model).values():
        check = getattr(cls, "validate", None)
        if check is not None:
            check(config)
