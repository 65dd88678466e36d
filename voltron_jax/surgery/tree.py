"""Generic param-tree helpers for checkpoint surgery: flat {path: leaf} views, logical axis names.

Paths are tuples of strings (dict keys; sequence indices as their decimal string), e.g.
('stack', 'block_0', 'layer_0', 'ffn', 'gate', 'kernel'). Boxed leaves (flax `nn.LogicallyPartitioned`,
as `jax.eval_shape(model.init, ...)` returns them) count as leaves, so their axis names stay readable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

Path = tuple[str, ...]


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def is_boxed(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def flatten(tree) -> dict[Path, Any]:
    """{path: leaf} in tree order; boxed leaves are kept boxed."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_boxed)
    return {tuple(_key(k) for k in path): leaf for path, leaf in leaves}


def unflatten(flat: dict[Path, Any]) -> dict:
    """Nested dicts from {path: leaf}."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def unbox(tree):
    """The tree with boxed leaves replaced by their values."""
    return nn.meta.unbox(tree)


def axis_names(tree) -> dict[Path, tuple | None]:
    """{path: logical axis names} for boxed leaves, None for plain ones."""
    return {
        p: (tuple(leaf.names) if is_boxed(leaf) and hasattr(leaf, "names") else None)
        for p, leaf in flatten(tree).items()
    }


def shape_of(leaf) -> tuple[int, ...]:
    leaf = leaf.unbox() if is_boxed(leaf) else leaf
    return tuple(leaf.shape)


def dtype_of(leaf) -> np.dtype:
    leaf = leaf.unbox() if is_boxed(leaf) else leaf
    return np.dtype(leaf.dtype)


def path_str(path: Path) -> str:
    return "/".join(path)


def count(tree) -> int:
    """Number of scalars in a (possibly boxed or abstract) tree."""
    return sum(int(np.prod(shape_of(leaf))) for leaf in flatten(tree).values())
