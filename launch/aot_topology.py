"""TPU topologies for the AOT compile on a CPU host: each named slice as a TPU VM presents it.

`describe` gives the slice's wraparound links and chips per host (libtpu alone builds every slice without
wraparound), `topology_devices` builds its devices with libtpu, `query` and `libtpu_topology` read back
what the devices report and what libtpu hands its compiler (tests/test_aot.py holds the two together).
Importing this module sets the CPU-host libtpu environment, so it must come before jax is imported
(launch/aot_compile.py imports it first).
"""

from __future__ import annotations

import glob
import math
import os
import re
import tempfile
from typing import NamedTuple

from voltron_jax.errors import VoltronError

# Compile on the CPU host; quiet libtpu's TPU-VM discovery (there is no TPU VM metadata here).
for _k, _v in (
    ("JAX_PLATFORMS", "cpu"),
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("TPU_ACCELERATOR_TYPE", "v4-8"),
    ("TF_CPP_MIN_LOG_LEVEL", "3"),
):
    os.environ.setdefault(_k, _v)
if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
    # No TPU chips on this host: let several compiles load libtpu at once (its lockfile guards chips).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 2**30
# bf16 dense peak per chip (datasheets).
PEAK_PER_CHIP = {"v4": 275e12, "v5p": 459e12, "v5e": 197e12, "v6e": 918e12, "v5litepod": 197e12}
CHIP_CONFIGS = ("auto", "megacore", "default")
EXAMPLES = "v4:2x2x1, v4:4x4x4 (v4-128), v5p:2x2x1, v5p:4x4x4 (v5p-128), v5e:2x2, v5e:16x16, v6e:4x4"


class TopologyError(VoltronError, ValueError):
    """A topology name libtpu does not know (or no libtpu)."""


def chip_config_for(name: str, chip_config: str = "auto") -> str:
    """libtpu's chip configuration: 'auto' is what a TPU VM of that type runs, megacore for v4 (one JAX
    device per chip, both TensorCores and the chip's 32 GiB behind it; libtpu's default for a v4
    topology is one device per TensorCore with half the HBM, which real v4 VMs do not present)."""
    if chip_config not in CHIP_CONFIGS:
        raise TopologyError(f"--chip_config={chip_config!r} is not one of {'|'.join(CHIP_CONFIGS)}.")
    if chip_config != "auto":
        return chip_config
    return "megacore" if name.split(":")[0] == "v4" else "default"


# Wraparound (torus) links as a TPU VM of the slice has them. 3-D generations: a slice made of whole 4x4x4
# cubes is a torus on every axis (the optical switches close each ring), a smaller one (2x2x1 .. 2x4x4) is
# a mesh without wraparound. 2-D generations: an axis wraps when it spans the pod's full 16 chips (v5e-256
# 16x16 wraps x and y, v5e-128 8x16 only y). Left unset, libtpu builds every slice WITHOUT wraparound,
# so a torus slice's collectives were priced for a mesh (tests/test_aot.py).
TORUS_3D = ("v4", "v5p", "v5")
TORUS_2D_SPAN = {"v5e": 16, "v5litepod": 16, "v6e": 16}


class Topology(NamedTuple):
    """A TPU slice (or several, joined by DCN) as the TPU runtime presents it: what libtpu needs beyond the
    name to build the same machine (wraparound links, chips per host) and how many slices."""

    name: str  # libtpu's TYPE:AxB[xC] (chips of one slice)
    chip_config: str  # libtpu chip configuration ('default' or 'megacore')
    wrap: tuple[bool, bool, bool]  # wraparound links per axis
    chips_per_host_bounds: tuple[int, int, int]  # chips of one host per axis
    num_slices: int = 1  # slices joined by DCN (multislice)

    @property
    def shape(self) -> tuple[int, int, int]:
        dims = [int(x) for x in self.name.split(":")[1].split("x")]
        return tuple(dims + [1] * (3 - len(dims)))

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        return tuple(s // h for s, h in zip(self.shape, self.chips_per_host_bounds))

    def kwargs(self) -> dict:
        """Keyword arguments of `jax.experimental.topologies.get_topology_desc` (libtpu's options)."""
        kw = dict(wrap=list(self.wrap), chips_per_host_bounds=list(self.chips_per_host_bounds))
        if self.chip_config != "default":
            kw["chip_config_name"] = self.chip_config
        if self.num_slices > 1:
            kw["num_slices"] = self.num_slices
        return kw


def describe(name: str, chip_config: str = "auto", num_slices: int = 1) -> Topology:
    """The slice `name` (libtpu's TYPE:AxB[xC]) as a TPU VM of that shape presents it; TopologyError for a
    malformed name or slice count."""
    if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", name):
        raise TopologyError(f"topology {name!r} is not of the form TYPE:AxB[xC]; e.g. {EXAMPLES}.")
    if num_slices < 1:
        raise TopologyError(f"--num_slices={num_slices}: give 1 (one slice) or more slices joined by DCN.")
    kind = chip_config_for(name, chip_config)
    gen = name.split(":")[0]
    dims = [int(x) for x in name.split(":")[1].split("x")]
    shape = dims + [1] * (3 - len(dims))
    if gen in TORUS_3D and len(dims) == 3:
        wrap = (all(d % 4 == 0 for d in dims),) * 3
    elif gen in TORUS_2D_SPAN:
        wrap = tuple(i < len(dims) and shape[i] == TORUS_2D_SPAN[gen] for i in range(3))
    else:  # other generations: libtpu's own default (no wraparound)
        wrap = (False, False, False)
    per_host = (min(shape[0], 2), min(shape[1], 2), 1)  # 4-chip hosts (2x2), as every multi-host VM type
    return Topology(name, kind, wrap, per_host, num_slices)


def topology_devices(name: str, chip_config: str = "auto", num_slices: int = 1) -> list:
    """The devices of a libtpu topology such as 'v4:4x4x4', built as the TPU runtime presents the slice
    (`describe`: wraparound links, chips per host; `num_slices` slices joined by DCN, each device's
    slice_index set); TopologyError with one clear message."""
    from jax.experimental import topologies

    topo = describe(name, chip_config, num_slices)
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **topo.kwargs()).devices)
    except Exception as e:  # libtpu raises JaxRuntimeError (unknown type, bad shape) or is missing
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(
            f"unknown TPU topology {name!r} ({detail}); use a libtpu topology name such as {EXAMPLES} "
            "(libtpu must be installed: pip install -e '.[aot]')."
        ) from e


def query(devices) -> dict:
    """What libtpu reports about the devices it built: chip bounds (from the chips' coordinates), chips
    per host (the coordinate span of process 0's chips), processes, slices and devices per chip."""
    chips_ = {(getattr(d, "slice_index", None) or 0, tuple(d.coords)) for d in devices}
    bounds = tuple(max(c[i] for _, c in chips_) + 1 for i in range(3))
    host0 = [tuple(d.coords) for d in devices if d.process_index == 0]
    per_host = tuple(max(c[i] for c in host0) - min(c[i] for c in host0) + 1 for i in range(3))
    return dict(
        chip_bounds=bounds,
        chips_per_host_bounds=per_host,
        processes=len({d.process_index for d in devices}),
        slices=len({getattr(d, "slice_index", None) or 0 for d in devices}),
        chips=len(chips_),
        devices_per_chip=len(devices) // len(chips_),
    )


def libtpu_topology(devices) -> dict:
    """The topology libtpu hands its compiler for `devices`: compiles a one-op program over all of them
    with XLA's dump on and decodes the TpuPjRtTopologyDescriptionProto that libtpu writes beside it
    (topology.textproto). Keys: chip_config, chips_per_host_bounds, host_bounds, wrap (False on every
    axis when the proto leaves it unset)."""
    import ast

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("x",))
    x = jax.ShapeDtypeStruct(
        (len(devices) * 128,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x"))
    )
    cache = jax.config.jax_enable_compilation_cache
    with tempfile.TemporaryDirectory(prefix="aot_topology_") as dump:
        jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would write no dump
        try:
            jax.jit(lambda a: a * 2).lower(x).compile(compiler_options={"xla_dump_to": dump})
        finally:
            jax.config.update("jax_enable_compilation_cache", cache)
        (path,) = glob.glob(os.path.join(dump, "*", "topology.textproto"))
        with open(path) as f:
            value = re.search(r'value: "(.*)"', f.read()).group(1)
    fields = dict(_proto_fields(_proto_fields(ast.literal_eval(f'b"{value}"'))[0][1]))  # field 1: the slice

    def xyz(v) -> tuple[int, int, int]:
        d = dict(_proto_fields(v)) if v else {}
        return tuple(d.get(i, 0) for i in (1, 2, 3))

    return dict(
        chip_config=fields[4].decode(),
        chips_per_host_bounds=xyz(fields[5]),
        host_bounds=xyz(fields[6]),
        wrap=tuple(bool(w) for w in xyz(fields.get(7, b""))),
    )


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, varint or raw bytes) of a serialized protobuf message: the wire format, no schema."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = buf[i]
            value, shift, i = value | (b & 0x7F) << shift, shift + 7, i + 1
            if b < 0x80:
                return value, i

    out, i = [], 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            v, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            v, i = buf[i : i + n], i + n
        else:  # fixed 32/64-bit: not used by the topology fields read here
            size = 4 if wire == 5 else 8
            v, i = buf[i : i + size], i + size
        out.append((key >> 3, v))
    return out


def chips(name: str) -> int:
    return math.prod(int(x) for x in name.split(":")[1].split("x"))


def available_hbm(devices) -> float:
    """Usable HBM bytes per device, as libtpu reports it when a probe program overflows it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices[:1]), ("x",))
    probe = jax.ShapeDtypeStruct((2**40 // 4,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda a: a * 2 + 1).lower(probe).compile()
    except Exception as e:
        m = re.search(r"available HBM \(([\d.]+)([GMK])\)", str(e))
        if m:
            return float(m.group(1)) * {"G": GIB, "M": 2**20, "K": 2**10}[m.group(2)]
    return float("nan")


def slice_line(d: dict) -> str:
    """One line for a Topology (as a dict): the links and hosts the compile priced its collectives for."""
    axes = "".join(a for a, w in zip("xyz", d["wrap"]) if w)
    per_host = "x".join(map(str, d["chips_per_host_bounds"]))
    n = d["num_slices"]
    return (
        f"slice {d['name']}: {'torus (wraparound ' + axes + ')' if axes else 'no wraparound links'}, "
        f"{per_host} chips per host" + (f"; {n} slices joined by DCN (mesh data axis)" if n > 1 else "")
    )
