"""How libtpu's memory figures relate, on programs small enough to read: a donated train step of a scanned,
rematerialised stack of L layers [2, D, D] over T tokens, AOT-compiled for one v4 megacore chip.

    python benchmarks/aot_memory_accounting.py        # needs libtpu (pip install -e '.[aot]'); ~1 min

Prints per program: the memory analysis (arguments, outputs, aliased, temporaries), its sum (what
launch/aot_compile.py prints as the upper bound), and the buffer assignment's heap (parameters + the
preallocated temporaries block, the figure libtpu's own out-of-memory check reports) with that block.
docs/results.md, "Pod configs (AOT)", reads the output.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
import aot_compile  # noqa: E402  (sets the CPU-host libtpu environment before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

D = 2048
MIB = 2**20


def step(w, x):
    """One SGD step on a scanned stack h <- h + tanh(h W0) W1, each layer rematerialised."""

    def loss(w):
        def body(h, wl):
            layer = jax.checkpoint(
                lambda h, wl: h + jnp.tanh(h @ wl[0].astype(h.dtype)) @ wl[1].astype(h.dtype)
            )
            return layer(h, wl), None

        h, _ = jax.lax.scan(body, x, w)
        return jnp.sum(h.astype(jnp.float32) ** 2)

    return w - 0.1 * jax.grad(loss)(w)


def measure(n_layers: int, tokens: int) -> dict:
    device = aot_compile.topology_devices("v4:2x2x1")[:1]
    replicated = NamedSharding(Mesh(device, ("x",)), PartitionSpec())
    w = jax.ShapeDtypeStruct((n_layers, 2, D, D), jnp.float32, sharding=replicated)
    x = jax.ShapeDtypeStruct((tokens, D), jnp.bfloat16, sharding=replicated)
    with tempfile.TemporaryDirectory() as dump:
        lowered = jax.jit(step, donate_argnums=0).lower(w, x)
        mem = lowered.compile(compiler_options={"xla_dump_to": dump}).memory_analysis()
        heap = aot_compile.heap_bytes(dump)
        text = open(glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt"))[0]).read()
    block = sum(int(s) for s in re.findall(r"allocation \d+: size (\d+), preallocated-temp", text))
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return dict(
        layers=n_layers,
        tokens=tokens,
        arguments=mem.argument_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        total=total,
        heap=heap,
        block=block,
    )


def main() -> None:
    print(
        "| layers | tokens | arguments | temporaries (analysis) | analysis sum | heap | preallocated block |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n_layers, tokens in ((8, 8192), (32, 8192), (32, 32768)):
        r = measure(n_layers, tokens)
        cells = [r[k] / MIB for k in ("arguments", "temporaries", "total", "heap", "block")]
        print(f"| {n_layers} | {tokens} | " + " | ".join(f"{c:.0f} MiB" for c in cells) + " |")


if __name__ == "__main__":
    main()
