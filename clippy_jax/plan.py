"""Memory and communication plan of a config's train step on N devices, before renting them.

    python -m clippy_jax.plan --config=configs/cc12m.py --devices=32 [--accelerator="NVIDIA H100"] \
        [--config.mesh.fsdp=8 --config.mesh.data=-1 ...]

The real train state and train step are built from abstract shapes on N forced host CPU devices
(`jax.eval_shape`, then AOT `lower().compile()` with the config's mesh and shardings): no data is
read and no parameter is materialised. Printed per device: parameter, optimiser-state and gradient
bytes (exact, from the shardings), XLA's memory analysis of the compiled step (arguments, outputs,
temporaries), FLOPs per step, every collective of the compiled program (kind, bytes, mesh axes,
executions per step) and, for a named accelerator, an estimated step time and MFU from data-sheet
peaks, with a verdict on whether it fits and what to change if not. See `clippy_jax/plan.md`.
"""

import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from clippy_jax import sharding
from clippy_jax.data.preprocess import kept_patch_count
from clippy_jax.models import TwoTower, build_model
from clippy_jax.models.t5 import T5_VOCAB_SIZE
from clippy_jax.models.vit import patch_geometry, patch_grid
from clippy_jax.train import perf
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import abstract_train_state, make_train_step

GB = 1e9
_LISTED = 12  # collectives listed one by one


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Data-sheet peaks of one device: dense bf16 FLOP/s, memory, and one-direction interconnect
    bandwidth per device inside a node (NVLink / ICI) and between nodes (InfiniBand / DCN)."""

    flops: float
    memory_bytes: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    devices_per_node: int


ACCELERATORS: dict[str, Accelerator] = {
    # SXM parts, 8 GPUs per NVLink node, one 400 Gb/s (A100: 200 Gb/s) InfiniBand NIC per GPU.
    "NVIDIA A100": Accelerator(312e12, 80e9, 300e9, 25e9, 8),
    "NVIDIA H100": Accelerator(989e12, 80e9, 450e9, 50e9, 8),
    "NVIDIA H200": Accelerator(989e12, 141e9, 450e9, 50e9, 8),
    # One slice: every chip on the ICI torus (a node is the whole slice). ICI: 2400 / 1600 / 4800 Gb/s.
    "TPU v4": Accelerator(275e12, 32 * 2**30, 300e9 / 2, 12.5e9, 4096),
    "TPU v5e": Accelerator(197e12, 16 * 2**30, 200e9 / 2, 12.5e9, 256),
    "TPU v5p": Accelerator(459e12, 95 * 2**30, 600e9 / 2, 12.5e9, 8960),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r"|f8\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"=\s(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLED = re.compile(r"(?:to_apply|calls|branch_computations|condition)=\{?%?([\w.\-, %]+)\}?")


def _array_sizes(text: str) -> list[int]:
    """Bytes of each array type ('f32[8,128]{1,0}') in `text`."""
    return [_DTYPE_BYTES.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _ARRAY.findall(text)] or [0]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota device list '[4,2]T(1,0)' -> the flat device ids."""
    shape = [int(x) for x in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return (ids.transpose([int(x) for x in perm.split(",")]) if perm else ids).reshape(-1)


def _groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective: listed, iota (`[G,S]<=[dims]T(perm)`), or over named axes
    of a device mesh (`mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}`)."""
    over_mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
                          r"\{([^}]*)\}", line)
    if over_mesh:
        axes = re.findall(r"'(\w+)'=(\d+)", over_mesh[1])
        names, sizes = [name for name, _ in axes], [int(size) for _, size in axes]
        ids = _iota(over_mesh[2], over_mesh[3]) if over_mesh[2] else np.arange(math.prod(sizes))
        chosen = [names.index(name) for name in re.findall(r"'(\w+)'", over_mesh[4])]
        rest = [axis for axis in range(len(names)) if axis not in chosen]
        grouped = ids.reshape(sizes).transpose(rest + chosen)
        return grouped.reshape(-1, math.prod(sizes[a] for a in chosen)).tolist()
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        return _iota(iota[2], iota[3]).reshape(int(iota[1].split(",")[0]), -1).tolist()
    listed = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{}]*\})?\}", line)
    if listed and listed[1]:
        return [[int(x) for x in group.split(",") if x] for group in re.findall(r"\{([\d,]*)\}", listed[1])]
    return [list(range(num_devices))]


def _axes(groups: list[list[int]], mesh_shape: tuple[int, ...], axis_names: tuple[str, ...]) -> tuple[str, ...]:
    """Mesh axes along which the members of a group differ (device ids are positions in the mesh)."""
    varying = set()
    for group in groups:
        coords = np.array(np.unravel_index(group, mesh_shape)).T  # [members, axes]
        varying |= {axis_names[a] for a in range(len(mesh_shape)) if len(set(coords[:, a])) > 1}
    return tuple(name for name in axis_names if name in varying)


def _multipliers(hlo: str) -> dict[str, int]:
    """Executions per step of each computation: while bodies run their known trip count."""
    calls: dict[str, list[tuple[str, int]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match and "=" not in line.split("{")[0]:
            current = match[1]
            calls[current] = []
            entry = current if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        loop = _WHILE.search(line)
        if loop:
            trips = _TRIP_COUNT.search(line)
            calls[current].append((loop[1], int(trips[1]) if trips else 1))
        for names in _CALLED.findall(line):
            calls[current] += [(name.strip(" %"), 1) for name in names.split(",") if name.strip(" %")]
    counts: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        counts[name] = counts.get(name, 0) + times
        for callee, trips in calls.get(name, []):
            visit(callee, times * trips)

    if entry is not None:
        visit(entry, 1)
    return counts


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # the whole array the collective works on (after an all-gather, before a reduce-scatter)
    group_size: int
    axes: tuple[str, ...]
    count: int  # executions per step

    def wire_bytes(self) -> float:
        """Bytes each device sends per execution with ring algorithms."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2 * (n - 1) / n * self.bytes
        if self.kind == "collective-permute":
            return float(self.bytes)
        return (n - 1) / n * self.bytes


def collectives(hlo: str, mesh: jax.sharding.Mesh) -> list[Collective]:
    """Every collective in a compiled (SPMD-partitioned) HLO module, merged by (kind, bytes, axes)."""
    multipliers = _multipliers(hlo)
    found: dict[tuple, int] = {}
    current = None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match and "=" not in line.split("{")[0]:
            current = match[1]
            continue
        op = _INSTRUCTION.search(line)
        if not op:
            continue
        result, kind = op[1], op[2]
        groups = _groups(line, mesh.size)
        size = max(len(g) for g in groups)
        # Async forms return (operands, results, ...): their largest array is the result.
        result_bytes = max(_array_sizes(result)) if op[3] else sum(_array_sizes(result))
        whole = result_bytes * size if kind == "reduce-scatter" else result_bytes
        key = (kind, whole, size, _axes(groups, mesh.devices.shape, mesh.axis_names))
        found[key] = found.get(key, 0) + multipliers.get(current, 1)
    return [Collective(*key, count) for key, count in sorted(found.items(), key=lambda kv: -kv[0][1] * kv[1])]


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def batch_shapes(config: ml_collections.ConfigDict, model: TwoTower) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the pipeline produces for `config` and its `model` (see `data/pipeline.py`)."""
    data, batch = config.data, config.train.batch_size
    patch, stride = patch_geometry(model.image)
    keep = kept_patch_count(data.image_size, patch, data.keep_ratio, data.keep_patches, stride)
    shapes = dict(tokens=jax.ShapeDtypeStruct((batch, data.max_text_length), jnp.int32))
    if keep is None:
        shapes["image"] = jax.ShapeDtypeStruct((batch, data.image_size, data.image_size, 3), jnp.float32)
    else:
        shapes["patches"] = jax.ShapeDtypeStruct((batch, keep, patch * patch * 3), jnp.float32)
        shapes["patch_indices"] = jax.ShapeDtypeStruct((batch, keep), jnp.int32)
    return shapes


def make_plan(config: ml_collections.ConfigDict, accelerator: str = "") -> dict:
    """Compiles the config's train step for all `jax.devices()` and returns the plan (see module doc)."""
    vocab = config.model.text.get("vocab_size") or config.data.get("synthetic", {}).get("vocab_size") or T5_VOCAB_SIZE
    model = build_model(config.model, vocab)
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    grid = patch_grid((config.data.image_size,) * 2, *patch_geometry(model.image))
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_shapes(config, model).items()}
    state, state_shardings, _ = abstract_train_state(model, tx, example, mesh, config.seed, grid)
    step = make_train_step(model, tx, schedule, state_shardings, mesh, config.train.max_logit_scale, grid,
                           config.train.on_nonfinite == "skip", config.train.loss_block_size)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
             for k, v in example.items()}
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    plan = dict(
        devices=mesh.size,
        mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
        global_batch=config.train.batch_size,
        params=per_device_bytes(state.params),
        opt_state=per_device_bytes(state.opt_state),
        grads=per_device_bytes(state.params),  # the gradients have the parameters' shapes and shardings
        batch=per_device_bytes(batch),
        arguments=memory.argument_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        flops=perf.compiled_flops(compiled) or 0.0,
        collectives=collectives(compiled.as_text(), mesh),
    )
    plan["peak"] = plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
    if accelerator:
        plan.update(estimate(plan, accelerator, mesh, config))
    return plan


def estimate(plan: dict, accelerator: str, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> dict:
    """Step time (compute at peak FLOP/s plus collectives at data-sheet bandwidth, no overlap), MFU,
    and whether the step fits the device's memory, with the changes that would make it fit."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator={accelerator!r} is not in the table; choose from {sorted(ACCELERATORS)}.")
    spec = ACCELERATORS[accelerator]
    compute = plan["flops"] / spec.flops
    node_axes = _node_axes(mesh, spec.devices_per_node)
    communication = sum(
        c.count * c.wire_bytes() / (spec.inter_node_bytes_per_s if set(c.axes) & node_axes
                                    else spec.intra_node_bytes_per_s)
        for c in plan["collectives"])
    step_time = compute + communication
    out = dict(accelerator=accelerator, compute_s=compute, communication_s=communication, step_s=step_time,
               mfu=compute / step_time if step_time else 0.0, memory_bytes=spec.memory_bytes,
               fits=plan["peak"] <= spec.memory_bytes, advice=[])
    if not out["fits"]:
        out["advice"] = advice(plan, spec.memory_bytes, config)
    return out


def _node_axes(mesh: jax.sharding.Mesh, devices_per_node: int) -> set[str]:
    """Mesh axes whose devices lie on different nodes (device positions fill nodes in order)."""
    nodes = np.arange(mesh.size).reshape(mesh.devices.shape) // devices_per_node
    return {name for axis, name in enumerate(mesh.axis_names) if (np.diff(nodes, axis=axis) != 0).any()}


def advice(plan: dict, memory: float, config: ml_collections.ConfigDict) -> list[str]:
    """Changes that would bring the estimated peak under `memory`, largest lever first."""
    state = plan["params"] + plan["opt_state"] + plan["grads"]
    data, fsdp, model = (plan["mesh"][axis] for axis in sharding.MESH_AXES)
    lines = []
    if data > 1 and state > 0.1 * memory:
        lines.append(f"shard the parameters, gradients and optimiser state: --config.mesh.fsdp={data * fsdp} "
                     f"--config.mesh.data=1 (state {state / GB:.2f} GB per device now, about "
                     f"{state / data / GB:.2f} GB then)")
    towers = [t for t in ("image", "text") if config.model[t].get("remat", "none") == "none"]
    if towers:
        lines.append("rematerialise the transformer blocks (keep the matmul outputs, recompute the rest): "
                     + " ".join(f"--config.model.{t}.remat=dots" for t in towers))
    lines.append(f"halve the batch per device (temporaries {plan['temporaries'] / GB:.2f} GB scale with it): "
                 f"--config.train.batch_size={plan['global_batch'] // 2}, or more devices")
    return lines


def _gb(n: float) -> str:
    return f"{n / GB:.3f} GB"


def _bytes(n: int) -> str:
    return f"{n:,} B ({_gb(n)})"


def format_plan(plan: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    rows = [
        f"devices {plan['devices']} (mesh {mesh}), global batch {plan['global_batch']}",
        "",
        "| per device | bytes |",
        "|---|---|",
        f"| parameters | {_bytes(plan['params'])} |",
        f"| optimiser state | {_bytes(plan['opt_state'])} |",
        f"| gradients | {_bytes(plan['grads'])} |",
        f"| batch | {_bytes(plan['batch'])} |",
        f"| XLA arguments / outputs / aliased | {_gb(plan['arguments'])} / {_gb(plan['outputs'])} / "
        f"{_gb(plan['aliased'])} |",
        f"| XLA temporaries | {_bytes(plan['temporaries'])} |",
        f"| estimated peak (arguments + outputs - aliased + temporaries) | {_bytes(plan['peak'])} |",
        f"| FLOPs per step | {plan['flops']:.4g} |",
        "",
        "| collectives by kind and mesh axes | executions per step | bytes per step |",
        "|---|---|---|",
    ]
    totals: dict[tuple[str, str], list[int]] = {}
    for c in plan["collectives"]:
        total = totals.setdefault((c.kind, ",".join(c.axes) or "-"), [0, 0])
        total[0] += c.count
        total[1] += c.count * c.bytes
    rows += [f"| {kind} over {axes} | {n} | {size:,} |" for (kind, axes), (n, size) in totals.items()]
    rows += ["", f"| the {min(len(plan['collectives']), _LISTED)} largest of {len(plan['collectives'])} "
             "collectives | bytes | group | mesh axes | per step |", "|---|---|---|---|---|"]
    rows += [f"| {c.kind} | {c.bytes:,} | {c.group_size} | {','.join(c.axes) or '-'} | {c.count} |"
             for c in plan["collectives"][:_LISTED]]
    if "accelerator" in plan:
        rows += [
            "",
            f"{plan['accelerator']}: compute {plan['compute_s'] * 1e3:.1f} ms + collectives "
            f"{plan['communication_s'] * 1e3:.1f} ms = {plan['step_s'] * 1e3:.1f} ms per step, MFU "
            f"{plan['mfu']:.0%} (data-sheet peaks, no overlap); memory {_gb(plan['peak'])} of "
            f"{_gb(plan['memory_bytes'])}: {'fits' if plan['fits'] else 'does NOT fit'}",
        ]
        rows += [f"  - {line}" for line in plan["advice"]]
    return "\n".join(rows)


def _define_flags() -> None:
    """The command's flags, defined when it runs (not at import: other commands define --config too)."""
    config_flags.DEFINE_config_file("config", "configs/demo.py", "Configuration file.", lock_config=False)
    flags.DEFINE_integer("devices", 8, "Number of devices to plan for (forced host CPU devices).")
    flags.DEFINE_string("accelerator", "", f"Estimate step time and memory fit for one of {sorted(ACCELERATORS)}.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    accelerator, devices = flags.FLAGS.accelerator, flags.FLAGS.devices
    if accelerator and accelerator not in ACCELERATORS:
        raise app.UsageError(f"--accelerator={accelerator!r}; choose from {sorted(ACCELERATORS)}.")
    # Before the backend starts: N host CPU devices stand in for the accelerators.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
    if jax.device_count() != devices:
        sys.exit(f"JAX started with {jax.device_count()} devices, not --devices={devices}; run the plan in a "
                 "fresh process without XLA_FLAGS=--xla_force_host_platform_device_count.")
    print(format_plan(make_plan(flags.FLAGS.config, accelerator)))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
