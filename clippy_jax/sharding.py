"""Device mesh and t5x-style logical-to-mesh axis rules.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimiser
state sharded along `embed`, and a CNN's along its output channels `conv_out`), `model` (tensor
parallelism over `mlp`, `heads` and `vocab`). The batch is sharded over (`data`, `fsdp`).
"""

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Applied in order; a mesh axis already taken by an earlier dimension of the same array is skipped,
# so activations [batch, length, embed] shard batch over (data, fsdp) and keep embed whole.
LOGICAL_AXIS_RULES: Sequence[tuple[str, str | tuple[str, ...] | None]] = (
    ("batch", BATCH_AXES),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("joint_embed", None),
    ("relpos_buckets", None),
    # The CNN tower (models/efficientnet.py): kernels [conv_height, conv_width, conv_in, conv_out] and BatchNorm
    # [conv_out] over fsdp (channels are multiples of 8); the squeeze-and-excitation bottleneck stays whole.
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_squeeze", None),
    ("height", None),
    ("width", None),
)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves `config.mesh` ({data, fsdp, model}, one of them may be -1) against the device count."""
    sizes = [int(config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if known <= 0 or num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices; "
                "choose axis sizes whose product divides the device count."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices but "
            f"{num_devices} are available; make data * fsdp * model equal the device count (or use -1)."
        )
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp), everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def bind_mesh(mesh: Mesh) -> Iterator[None]:
    """Around a model call inside a jitted function, binds the mesh the function is compiled for,
    whatever context it is traced or lowered in: the model's `nn.with_logical_constraint`s become
    sharding constraints on `mesh` through LOGICAL_AXIS_RULES. (Flax drops them silently when no mesh
    is in context.)"""
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def logical_shardings(logical_specs, mesh: Mesh):
    """Logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
