"""Memory and communication plan of a config's train step on a pod, before renting it.

    python -m clippy_jax.plan --config=configs/cc12m.py --target="TPU v5e" --topology=16x16
    python -m clippy_jax.plan --config=configs/cc12m.py --target="NVIDIA H100" --devices=32 \
        [--config.mesh.fsdp=8 --config.mesh.data=-1 ...] [--compiler=cpu]

The real train state and train step are built from abstract shapes (`jax.eval_shape`) and compiled ahead
of time (`lower().compile()`) with the config's mesh and shardings over the target's devices, by the
target's own compiler (XLA:TPU from libtpu, XLA:GPU from the CUDA plugin; `clippy_jax.targets`), with no
accelerator present; without it (or with `--compiler=cpu`), XLA:CPU on as many host devices stands in,
labelled as such. Nothing is read or materialised. Printed per device: parameter, optimiser-state and
gradient bytes (exact, from the shardings), the compiler's memory analysis (arguments, outputs,
temporaries) or its out-of-memory refusal, FLOPs and HBM bytes per step, every collective of the compiled
program (kind, bytes, mesh axes, executions per step), a roofline step time and MFU from data-sheet peaks,
whether it fits and, if not, changes that would make it fit, each checked by compiling again. The config
passes the checks of `clippy_jax.main` first. See `clippy_jax/plan.md`.
"""

import dataclasses
import math
import re
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from clippy_jax import config_checks, platforms, sharding, targets
from clippy_jax.data.preprocess import kept_patch_count
from clippy_jax.models import TwoTower, build_model
from clippy_jax.models.t5 import T5_VOCAB_SIZE
from clippy_jax.models.towers import feature_grid, is_cnn, patch_geometry
from clippy_jax.train import perf
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import abstract_train_state, make_train_step

GB = 1e9
EXIT_DOES_NOT_FIT = 3  # the command's exit status when the step does not fit the target (2: bad flags or settings)
_LISTED = 12  # collectives listed one by one


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
    """The global batch the pipeline produces for `config` and its `model` (see `data/pipeline.py`): whole
    images for a CNN tower."""
    data, batch = config.data, config.train.batch_size
    geometry, keep = patch_geometry(model.image), None
    if geometry is not None:
        patch, stride = geometry
        keep = kept_patch_count(data.image_size, patch, data.keep_ratio, data.keep_patches, stride)
    shapes = dict(tokens=jax.ShapeDtypeStruct((batch, data.max_text_length), jnp.int32))
    if keep is None:
        shapes["image"] = jax.ShapeDtypeStruct((batch, data.image_size, data.image_size, 3), jnp.float32)
    else:
        shapes["patches"] = jax.ShapeDtypeStruct((batch, keep, patch * patch * 3), jnp.float32)
        shapes["patch_indices"] = jax.ShapeDtypeStruct((batch, keep), jnp.int32)
    return shapes


def _abstract_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
    """(jitted train step, abstract state, abstract global batch, mesh) of `config` on `devices`."""
    vocab = config.model.text.get("vocab_size") or config.data.get("synthetic", {}).get("vocab_size") or T5_VOCAB_SIZE
    model = build_model(config.model, vocab)
    mesh = sharding.make_mesh(config.mesh, devices)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    grid = feature_grid(model.image, (config.data.image_size,) * 2)
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_shapes(config, model).items()}
    state, state_shardings, _ = abstract_train_state(model, tx, example, mesh, config.seed, grid)
    step = make_train_step(model, tx, schedule, state_shardings, mesh, config.train.max_logit_scale, grid,
                           config.train.on_nonfinite == "skip", config.train.loss_block_size)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
             for k, v in example.items()}
    return step, state, batch, mesh


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# XLA:TPU's refusals: "Ran out of memory in memory space hbm. Used 15.79G of 15.75G hbm." and "Ran out of memory on
# HBM, the total memory required for HLO temporaries (38.53G) exceeds available HBM (15.75G)."
_OUT_OF_MEMORY = (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
                  re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                             r"\(([\d.]+)([KMGT]?)\)"))


def out_of_memory(error: Exception) -> tuple[float, float] | None:
    """(bytes needed, bytes available) when `error` is the compiler's out-of-memory refusal."""
    for pattern in _OUT_OF_MEMORY:
        match = pattern.search(str(error))
        if match:
            return float(match[1]) * _UNITS[match[2]], float(match[3]) * _UNITS[match[4]]
    return None


def costs(compiled: jax.stages.Compiled) -> dict[str, float]:
    """FLOPs and bytes accessed of one call of a compiled (per-device, partitioned and fused) program. XLA:GPU
    reports no cost analysis; its optimised HLO module is then costed by XLA's HLO cost analysis on the CPU
    client (custom calls such as cuDNN attention count no FLOPs there)."""
    analysis = perf.cost_analysis(compiled)
    if not analysis:
        from jax._src.lib import xla_client  # the one entry point to XLA's HLO cost analysis of a module

        module = compiled.runtime_executable().hlo_modules()[0]
        analysis = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return dict(flops=float(analysis.get("flops", 0.0)), bytes_accessed=float(analysis.get("bytes accessed", 0.0)))


def make_plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None, target: str = "",
              check_advice: bool = True) -> dict:
    """Compiles the config's train step for `devices` (default: `jax.devices()`) with their platform's compiler
    and returns the plan (see the module doc); with a `target` of `targets.ACCELERATORS`, also the roofline,
    the fit against its memory and, when it does not fit, advice (each checked by compiling again)."""
    devices = list(jax.devices() if devices is None else devices)
    step, state, batch, mesh = _abstract_step(config, devices)
    plan = dict(
        compiler=targets.compiler_name(devices),
        platform=platforms.platform_of(devices),
        devices=mesh.size,
        mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
        global_batch=config.train.batch_size,
        params=per_device_bytes(state.params),
        batch_stats=per_device_bytes(state.batch_stats),  # a CNN's BatchNorm running statistics (0 for the ViT)
        opt_state=per_device_bytes(state.opt_state),
        grads=per_device_bytes(state.params),  # the gradients have the parameters' shapes and shardings
        batch=per_device_bytes(batch),
        refused=None,
    )
    try:
        compiled = step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as error:
        plan["refused"] = out_of_memory(error)
        if plan["refused"] is None:
            raise
        plan["peak"] = plan["refused"][0]
    else:
        memory = compiled.memory_analysis()
        hlo = compiled.as_text()
        plan.update(
            arguments=memory.argument_size_in_bytes,
            outputs=memory.output_size_in_bytes,
            aliased=memory.alias_size_in_bytes,
            temporaries=memory.temp_size_in_bytes,
            **costs(compiled),
            collectives=collectives(hlo, mesh),
            hlo=hlo,
            cudnn_attention=len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo)),
        )
        plan["peak"] = plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
    if target:
        plan.update(estimate(plan, target, mesh, config))
        if not plan["fits"] and check_advice:
            plan["advice"] = [_check(change, config, devices, target) for change in plan["advice"]]
    return plan


@dataclasses.dataclass
class Change:
    """One way to lower the memory per device: what it does, its config overrides, and (once checked by compiling
    the changed config) whether it fits and its peak bytes per device."""

    why: str
    overrides: dict[str, object]
    fits: bool | None = None
    peak: float | None = None

    def flags(self) -> str:
        return " ".join(f"--config.{key}={value}" for key, value in self.overrides.items())


def _check(change: Change, config: ml_collections.ConfigDict, devices: Sequence[jax.Device], target: str) -> Change:
    changed = ml_collections.ConfigDict(config.to_dict())
    for key, value in change.overrides.items():
        *sections, name = key.split(".")
        node = changed
        for section in sections:
            node = node[section]
        node[name] = value
    try:
        config_checks.validate(changed, len(devices), paths=False)
    except config_checks.ConfigError:
        return change
    checked = make_plan(changed, devices, target, check_advice=False)
    return dataclasses.replace(change, fits=checked["fits"], peak=checked["peak"])


def estimate(plan: dict, target: str, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> dict:
    """Roofline step time (compute at peak FLOP/s or HBM traffic at peak bandwidth, whichever is longer, plus the
    collectives at data-sheet bandwidth, not overlapped), MFU, and whether the step fits the device's memory: the
    target compiler's own refusal, else the peak against `targets.ACCELERATORS[target].memory_bytes`."""
    spec = targets.ACCELERATORS[target]
    out = dict(target=target, memory_bytes=spec.memory_bytes, advice=[])
    if plan["refused"] is not None:
        out.update(fits=False, memory_bytes=plan["refused"][1])
    else:  # XLA:TPU refuses what does not fit its HBM; the others' peak is compared with the data sheet
        out["fits"] = plan["platform"] == "tpu" or plan["peak"] <= spec.memory_bytes
        compute, traffic = plan["flops"] / spec.flops, plan["bytes_accessed"] / spec.hbm_bytes_per_s
        node_axes = _node_axes(mesh, spec.devices_per_node)
        communication = sum(
            c.count * c.wire_bytes() / (spec.inter_node_bytes_per_s if set(c.axes) & node_axes
                                        else spec.intra_node_bytes_per_s)
            for c in plan["collectives"])
        step_time = max(compute, traffic) + communication
        out.update(compute_s=compute, hbm_s=traffic, communication_s=communication, step_s=step_time,
                   mfu=compute / step_time if step_time else 0.0)
    if not out["fits"]:
        out["advice"] = advice(plan, out["memory_bytes"], config)
    return out


def _node_axes(mesh: jax.sharding.Mesh, devices_per_node: int | None) -> set[str]:
    """Mesh axes whose devices lie on different nodes: GPUs fill nodes of `devices_per_node` in order; a TPU
    device's node is its slice (`slice_index` of a multi-slice topology)."""
    flat = list(mesh.devices.flat)
    if devices_per_node is None:
        nodes = np.array([getattr(d, "slice_index", 0) or 0 for d in flat])
    else:
        nodes = np.arange(mesh.size) // devices_per_node
    nodes = nodes.reshape(mesh.devices.shape)
    return {name for axis, name in enumerate(mesh.axis_names) if (np.diff(nodes, axis=axis) != 0).any()}


def advice(plan: dict, memory: float, config: ml_collections.ConfigDict) -> list[Change]:
    """Changes that would bring the peak under `memory`, largest lever first."""
    state = plan["params"] + plan["batch_stats"] + plan["opt_state"] + plan["grads"]
    data, fsdp, _ = (plan["mesh"][axis] for axis in sharding.MESH_AXES)
    changes = []
    if data > 1 and state > 0.1 * memory:
        changes.append(Change(f"shard the parameters, gradients and optimiser state over all {data * fsdp} "
                              f"data-parallel devices (state {state / GB:.2f} GB per device now, about "
                              f"{state / data / GB:.2f} GB then)", {"mesh.fsdp": data * fsdp, "mesh.data": 1}))
    transformers = ("text",) if is_cnn(config.model.image) else ("image", "text")  # the towers with `remat`
    towers = [t for t in transformers if config.model[t].get("remat", "none") == "none"]
    if towers:
        changes.append(Change("rematerialise the transformer blocks (keep the matmul outputs, recompute the rest)",
                              {f"model.{t}.remat": "dots" for t in towers}))
    if any(config.model[t].get("remat") != "full" for t in transformers):
        changes.append(Change("rematerialise everything but each block's input",
                              {f"model.{t}.remat": "full" for t in transformers}))
    if len(changes) > 1 and "mesh.fsdp" in changes[0].overrides:  # the batch kept: every lever at once
        combined = {k: v for change in changes for k, v in change.overrides.items()}
        changes.append(Change("both: shard the state and rematerialise everything (the batch kept)", combined))
    batch = plan["global_batch"] // 2
    overrides: dict[str, object] = {"train.batch_size": batch}
    if config.train.loss_block_size and batch % config.train.loss_block_size:
        overrides["train.loss_block_size"] = math.gcd(batch, config.train.loss_block_size)
    changes.append(Change("halve the batch per device (or use twice the devices)", overrides))
    return changes


def _gb(n: float) -> str:
    return f"{n / GB:.3f} GB"


def _bytes(n: int) -> str:
    return f"{n:,} B ({_gb(n)})"


def format_plan(plan: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    rows = [
        f"devices {plan['devices']} (mesh {mesh}), global batch {plan['global_batch']}",
        f"figures from {plan['compiler']}",
        "",
        "| per device | bytes |",
        "|---|---|",
        f"| parameters | {_bytes(plan['params'])} |",
        *([f"| BatchNorm statistics | {_bytes(plan['batch_stats'])} |"] if plan["batch_stats"] else []),
        f"| optimiser state | {_bytes(plan['opt_state'])} |",
        f"| gradients | {_bytes(plan['grads'])} |",
        f"| batch | {_bytes(plan['batch'])} |",
    ]
    if plan["refused"] is not None:
        needed, available = plan["refused"]
        rows += ["", f"The compiler refused the step: out of memory, needs {_gb(needed)} of {_gb(available)}."]
    else:
        rows += [
            f"| XLA arguments / outputs / aliased | {_gb(plan['arguments'])} / {_gb(plan['outputs'])} / "
            f"{_gb(plan['aliased'])} |",
            f"| XLA temporaries | {_bytes(plan['temporaries'])} |",
            f"| peak (arguments + outputs - aliased + temporaries) | {_bytes(plan['peak'])} |",
            f"| FLOPs per step | {plan['flops']:.4g} |",
            f"| HBM bytes accessed per step | {plan['bytes_accessed']:.4g} |",
            f"| cuDNN fused-attention calls | {plan['cudnn_attention']} |",
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
    if "target" in plan:
        rows.append("")
        if "step_s" in plan:
            bound = "compute" if plan["compute_s"] >= plan["hbm_s"] else "HBM"
            rows.append(
                f"{plan['target']} (estimate, a roofline from data-sheet peaks, no overlap): compute "
                f"{plan['compute_s'] * 1e3:.1f} ms, HBM traffic {plan['hbm_s'] * 1e3:.1f} ms ({bound}-bound) + "
                f"collectives {plan['communication_s'] * 1e3:.1f} ms = {plan['step_s'] * 1e3:.1f} ms per step, "
                f"MFU {plan['mfu']:.0%}")
        verdict = "fits" if plan["fits"] else "does NOT fit"
        rows.append(f"memory: {verdict}: needs {_gb(plan['peak'])} of {_gb(plan['memory_bytes'])} per device")
        for change in plan["advice"]:
            checked = ("" if change.fits is None else
                       f" -> checked by compiling: {'fits' if change.fits else 'does not fit'}, "
                       f"{_gb(change.peak)}")
            rows.append(f"  - {change.why}: {change.flags()}{checked}")
    return "\n".join(rows)


def _define_flags() -> None:
    """The command's flags, defined when it runs (not at import: other commands define --config too)."""
    config_flags.DEFINE_config_file("config", "configs/demo.py", "Configuration file.", lock_config=False)
    flags.DEFINE_string("target", "", f"Plan for one of {sorted(targets.ACCELERATORS)}: its compiler (when "
                        "installed), memory, data-sheet peaks and interconnect.")
    flags.DEFINE_integer("devices", 0, "GPUs (or, without --target, host CPU devices) to plan for; default 8.")
    flags.DEFINE_string("topology", "", "TPU slice topology of --target, e.g. 16x16 (v5e) or 2x2x4 (v4, v5p).")
    flags.DEFINE_integer("slices", 1, "TPU slices over the data-centre network (multi-slice).")
    flags.DEFINE_string("tpu_type", "", "A Cloud TPU accelerator type (v4-32, v5litepod-16, ...) instead of --target "
                        "and --topology: its default topology.")
    flags.DEFINE_enum("compiler", "target", ["target", "cpu"], "Compile with the target's own compiler, or with "
                      "XLA:CPU on as many host devices standing in for it.")
    flags.DEFINE_bool("check_advice", True, "Compile each suggested change when the step does not fit.")


def _device_count(target: str, count: int, topology: str, slices: int) -> int:
    """How many devices the plan is for, the flags checked."""
    if not target:
        return count or 8
    accelerator = targets.ACCELERATORS[target]
    if accelerator.platform == "tpu":
        if not topology or not re.fullmatch(r"\d+(x\d+)+", topology):
            raise app.UsageError(f"--target={target!r} needs --topology, the slice's chips per side (e.g. 4x4, "
                                 f"16x16, 2x2x4), got {topology!r}.")
        if count:
            raise app.UsageError("--devices is for GPUs; a TPU slice's devices follow from --topology and --slices.")
        return targets.topology_chips(topology) * slices
    if topology or slices != 1:
        raise app.UsageError(f"--topology and --slices are for TPUs; pass --devices for {target!r}.")
    return count or 8


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    options = flags.FLAGS
    target, topology = options.target, options.topology
    if options.tpu_type:
        if target or topology:
            raise app.UsageError("--tpu_type names the target and its topology: pass it without them.")
        try:
            target, topology = targets.tpu_slice(options.tpu_type)
        except ValueError as error:
            raise app.UsageError(str(error)) from None
    if target and target not in targets.ACCELERATORS:
        raise app.UsageError(f"--target={target!r}; choose from {sorted(targets.ACCELERATORS)}.")
    count = _device_count(target, options.devices, topology, options.slices)
    config = options.config
    try:
        config_checks.validate(config, count, paths=False)  # what `clippy_jax.main` checks, less the paths
    except config_checks.ConfigError as error:
        print(f"plan: {error}", file=sys.stderr)
        sys.exit(2)
    # Before the backend starts: host CPU devices for the stand-in (and the target's devices beside them).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
    if jax.device_count() != count:
        sys.exit(f"JAX started with {jax.device_count()} devices, not {count}; run the plan in a fresh process "
                 "without XLA_FLAGS=--xla_force_host_platform_device_count.")
    devices = jax.devices()
    if target and options.compiler == "target":
        try:
            devices = targets.target_devices(target, count, topology, options.slices)
        except targets.TargetUnavailable as error:
            print(f"plan: {error}; XLA:CPU stands in for it.", file=sys.stderr)
    report = make_plan(config, devices, target, options.check_advice)
    print(format_plan(report))
    if target and not report["fits"]:
        sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
