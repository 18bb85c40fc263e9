"""The accelerators the project plans for: data-sheet figures, and their devices for compilation without them.

`target_devices` returns the devices of a TPU slice (libtpu's topology; `pip install ".[aot]"`) or of N GPUs
described by `gpu_targets/*.txtpb` (XLA's `GpuTargetConfigProto`, written from the data sheets; the CUDA
plugin). A program lowered over a mesh of them and compiled runs that platform's own compiler in this process
(deviceless ahead-of-time compilation), whatever the default backend: its memory analysis, its out-of-memory
refusal and its HLO are the target's. Nothing here needs the hardware.
"""

import dataclasses
import importlib.metadata
import importlib.util
import itertools
import math
import os
from collections.abc import Sequence

import jax

from clippy_jax import platforms

_GPU_TARGETS = os.path.join(os.path.dirname(__file__), "gpu_targets")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Data-sheet figures of one device (a GPU, a TPU chip or, without megacore, one TensorCore).

    Attributes:
      platform: 'gpu' or 'tpu'.
      flops: dense bf16 peak FLOP/s.
      memory_bytes: memory a program may use: a TPU's HBM; for a GPU, the share that JAX preallocates under the
        launch scripts' XLA_PYTHON_CLIENT_MEM_FRACTION=0.9.
      hbm_bytes_per_s: memory bandwidth.
      intra_node_bytes_per_s, inter_node_bytes_per_s: one-direction interconnect bandwidth per device inside a
        node (NVLink; ICI inside a TPU slice) and between nodes (InfiniBand; DCN between slices).
      devices_per_node: GPUs per NVLink node; for a TPU, None: a node is one slice.
      name: the TPU generation in libtpu's topology names ('v5e'), or the GPU's target description file.
      megacore: a TPU chip whose two TensorCores run as one device (v4, v5p).
    """

    platform: str
    flops: float
    memory_bytes: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    devices_per_node: int | None
    name: str
    megacore: bool = False


_GPU_MEMORY_FRACTION = 0.9  # launch/gpu/common.sh: XLA_PYTHON_CLIENT_MEM_FRACTION
ACCELERATORS: dict[str, Accelerator] = {
    # SXM parts, 8 GPUs per NVLink node (600 / 900 GB/s both directions), one 200 (A100) or 400 Gb/s InfiniBand NIC
    # per GPU; memory as CUDA reports it (the target descriptions' device_memory_size).
    "NVIDIA A100": Accelerator("gpu", 312e12, _GPU_MEMORY_FRACTION * 85899345920, 2.039e12, 300e9, 25e9, 8,
                               "a100_sxm_80.txtpb"),
    "NVIDIA H100": Accelerator("gpu", 989e12, _GPU_MEMORY_FRACTION * 84978434048, 3.35e12, 450e9, 50e9, 8,
                               "h100_sxm.txtpb"),
    "NVIDIA H200": Accelerator("gpu", 989e12, _GPU_MEMORY_FRACTION * 150754820096, 4.8e12, 450e9, 50e9, 8,
                               "h200_sxm.txtpb"),
    # Per chip; ICI 2400 / 1600 / 4800 / 3584 Gb/s per chip both directions; DCN ~100 Gb/s per chip between slices.
    "TPU v4": Accelerator("tpu", 275e12, 32 * 2**30, 1.228e12, 150e9, 12.5e9, None, "v4", megacore=True),
    "TPU v5e": Accelerator("tpu", 197e12, 16 * 2**30, 0.819e12, 100e9, 12.5e9, None, "v5e"),
    "TPU v5p": Accelerator("tpu", 459e12, 95 * 2**30, 2.765e12, 300e9, 12.5e9, None, "v5p", megacore=True),
    "TPU v6e": Accelerator("tpu", 918e12, 32 * 2**30, 1.64e12, 224e9, 12.5e9, None, "v6e"),
}


_SINGLE_HOST_CHIPS = 8  # v5e and v6e slices of up to 8 chips are one host (v5litepod-1, -4, -8)
# Cloud TPU accelerator types: generation prefix -> (target, TensorCores per chip counted in the type's number).
_TPU_TYPES = {"v4": ("TPU v4", 2), "v5p": ("TPU v5p", 2), "v5litepod": ("TPU v5e", 1), "v6e": ("TPU v6e", 1)}


class TargetUnavailable(RuntimeError):
    """The target's compiler is not installed (or refused the topology); the message says what to install."""


def _accelerator_type(target: str, topology: str) -> str:
    """Cloud TPU's name of a slice: 'v5litepod-16' for a v5e 4x4, 'v4-32' for a v4 2x2x4 (TensorCores counted)."""
    prefix, (_, cores_per_chip) = next((p, t) for p, t in _TPU_TYPES.items() if t[0] == target)
    return f"{prefix}-{topology_chips(topology) * cores_per_chip}"


def _tpu_devices(target: str, topology: str, slices: int) -> list[jax.Device]:
    accelerator = ACCELERATORS[target]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
    # No TPU is opened, so compiling processes may run side by side (libtpu otherwise takes /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # What a TPU VM's metadata would say; without them libtpu logs errors at start-up. The devices come from the
    # topology asked for below, whatever these say (checked: a v4 slice after a v5e one in the same process).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(target, topology))
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise TargetUnavailable('the TPU compiler (libtpu) is not installed: pip install ".[aot]"')
    kwargs = dict(chip_config_name="megacore") if accelerator.megacore else {}
    sides = [int(side) for side in topology.split("x")]
    if not accelerator.megacore and math.prod(sides) <= _SINGLE_HOST_CHIPS:  # v5e / v6e slices of one host
        kwargs["chips_per_host_bounds"] = (*sides, 1) if len(sides) == 2 else tuple(sides)
    if slices > 1:
        kwargs["num_slices"] = slices
    return list(topologies.get_topology_desc(platform="tpu", topology_name=f"{accelerator.name}:{topology}",
                                             **kwargs).devices)


def _gpu_devices(accelerator: Accelerator, count: int) -> list[jax.Device]:
    from jax.experimental import topologies

    if not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12)):
        raise TargetUnavailable('the GPU compiler (the CUDA plugin of JAX) is not installed: pip install ".[aot]"')
    nodes, per_node = (1, count) if count <= accelerator.devices_per_node else (
        count // accelerator.devices_per_node, accelerator.devices_per_node)
    if nodes * per_node != count:
        raise ValueError(f"{count} GPUs do not fill nodes of {accelerator.devices_per_node}; "
                         f"choose a multiple of {accelerator.devices_per_node}.")
    with open(os.path.join(_GPU_TARGETS, accelerator.name)) as f:
        description = f.read()
    shape = f"{nodes}x1x{per_node}"  # nodes x hosts per node x GPUs per host
    return list(topologies.get_topology_desc(platform="cuda", topology_name=shape, target_config=description,
                                             topology=shape).devices)


def target_devices(target: str, count: int = 0, topology: str = "", slices: int = 1) -> list[jax.Device]:
    """The devices of `target` (a key of ACCELERATORS): `count` GPUs, or the TPU slice `topology` ('16x16',
    '2x2x4'; one device per chip, megacore where the chip has it) times `slices` over DCN.

    Raises TargetUnavailable when the target's compiler is not installed."""
    accelerator = ACCELERATORS[target]
    try:
        if accelerator.platform == "tpu":
            return _tpu_devices(target, topology, slices)
        return _gpu_devices(accelerator, count)
    except TargetUnavailable:
        raise
    except jax.errors.JaxRuntimeError as error:
        raise TargetUnavailable(f"{target}: {str(error).splitlines()[0]}") from error


def tpu_slice(accelerator_type: str) -> tuple[str, str]:
    """(target, topology) of a Cloud TPU accelerator type as `gcloud compute tpus` names it, in the default
    topology Cloud TPU gives it: 'v4-32' -> ('TPU v4', '2x2x4'), 'v5litepod-16' -> ('TPU v5e', '4x4')."""
    generation, _, number = accelerator_type.rpartition("-")
    if generation not in _TPU_TYPES or not number.isdigit():
        raise ValueError(f"Unknown TPU accelerator type {accelerator_type!r}; expected e.g. v4-32, v5litepod-16, "
                         "v5p-128 or v6e-256.")
    target, cores_per_chip = _TPU_TYPES[generation]
    chips = int(number) // cores_per_chip
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{accelerator_type!r} is not a slice of a power-of-two number of chips.")
    three_d = cores_per_chip == 2
    if chips < 4:  # noqa: PLR2004
        sides = [1, 1, chips] if three_d else [1, chips]
    else:  # from one host's 2x2(x1), each side doubled in turn from the last: 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
        sides = [2, 2, 1] if three_d else [2, 2]
        order = itertools.cycle(range(len(sides) - 1, -1, -1))
        if three_d and chips > 4:  # noqa: PLR2004
            sides[2] = 2
        while math.prod(sides) < chips:
            sides[next(order)] *= 2
    return target, "x".join(map(str, sides))


def topology_chips(topology: str) -> int:
    """Chips of a TPU topology name ('16x16' -> 256, '2x2x4' -> 16)."""
    return math.prod(int(side) for side in topology.split("x"))


def compiler_name(devices: Sequence[jax.Device]) -> str:
    """Which compiler builds programs for `devices`, with its version: what the plan's figures come from."""
    platform = platforms.platform_of(devices)
    if platform == "tpu":
        return f"XLA:TPU (libtpu {importlib.metadata.version('libtpu')}, {devices[0].device_kind})"
    if platform == "gpu":
        plugins = [d.metadata["Name"] for d in importlib.metadata.distributions()
                   if d.metadata["Name"].startswith("jax-cuda") and d.metadata["Name"].endswith("-plugin")]
        version = importlib.metadata.version(plugins[0]) if plugins else "?"
        return f"XLA:GPU ({plugins[0] if plugins else 'CUDA plugin'} {version}, {devices[0].device_kind})"
    return f"XLA:CPU (jaxlib {importlib.metadata.version('jaxlib')}), standing in for the target"
