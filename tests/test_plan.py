"""The plan command: per-device bytes against the real sharded train state, collectives against
collectives written by hand, on the 8 forced host devices of conftest."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clippy_jax import config_checks, plan, sharding
from clippy_jax.models import build_model
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import create_train_state
from tests.helpers import REPO

CONFIG = "configs/demo.py:size=tiny"
MESH_FLAGS = ("--config.mesh.data=-1", "--config.mesh.fsdp=2", "--config.mesh.model=2")


def _device_bytes(tree) -> int:
    """The most bytes any one device holds of the real arrays, summed from their addressable shards."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def _printed_bytes(output: str, row: str) -> int:
    return int(re.search(rf"\| {row} \| ([\d,]+) B", output)[1].replace(",", ""))


def _load_config():
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("size=tiny")


def test_printed_state_bytes_equal_the_sharded_arrays_and_fsdp_has_collectives():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the command forces its own devices
    result = subprocess.run([sys.executable, "-m", "clippy_jax.plan", f"--config={CONFIG}", "--target=TPU v4",
                             "--topology=2x2x2", "--compiler=cpu", *MESH_FLAGS], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, check=True)
    assert "devices 8 (mesh data=2 x fsdp=2 x model=2)" in result.stdout
    assert "figures from XLA:CPU" in result.stdout and "standing in for the target" in result.stdout

    config = _load_config()
    config.mesh.update(data=-1, fsdp=2, model=2)
    model = build_model(config.model, config.data.synthetic.vocab_size)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    mesh = sharding.make_mesh(config.mesh)
    side = config.data.image_size // config.model.image.patch_size
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in plan.batch_shapes(config, model).items()}
    state, _ = create_train_state(model, tx, example, mesh, config.seed, (side, side))
    assert _printed_bytes(result.stdout, "parameters") == _device_bytes(state.params)
    assert _printed_bytes(result.stdout, "optimiser state") == _device_bytes(state.opt_state)
    sharded = [leaf for leaf in jax.tree.leaves(state.params) if not leaf.sharding.is_fully_replicated]
    assert sharded and _device_bytes(state.params) < sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    collectives = re.findall(r"^\| (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute) over "
                             r"([\w,-]+) \| (\d+) \|", result.stdout, re.MULTILINE)
    assert any("fsdp" in axes.split(",") and int(count) > 0 for _, axes, count in collectives)
    assert "TPU v4 (estimate, a roofline" in result.stdout and "memory: fits" in result.stdout


def test_collectives_are_found_with_their_bytes_and_mesh_axes():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)

    def fn(x, y):  # x [8, 16] f32 sharded (data, fsdp); y [4] f32 sharded over model
        summed = jax.lax.psum(x, "fsdp")  # all-reduce of the local [4, 16] block: 256 bytes
        gathered = jax.lax.all_gather(y, "model", tiled=True)  # all-gather to [4] f32: 16 bytes
        return summed, gathered

    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec("data", "fsdp"), PartitionSpec("model")),
                           out_specs=(PartitionSpec("data"), PartitionSpec()), check_vma=False)
    x = jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data", "fsdp")))
    y = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("model")))
    found = plan.collectives(jax.jit(mapped).lower(x, y).compile().as_text(), mesh)
    assert {(c.kind, c.bytes, c.group_size, c.axes) for c in found} == {
        ("all-reduce", 4 * 16 * 4, 2, ("fsdp",)), ("all-gather", 4 * 4, 2, ("model",))}


def test_advice_for_a_plan_that_does_not_fit_names_valid_settings():
    """Each suggested flag is one the config accepts: remat is offered (as a policy) only for the towers
    that have none, FSDP only when the state is large and data-parallel."""
    config = _load_config()
    config.model.text.remat = "full"
    gb = plan.GB
    too_big = dict(params=4 * gb, batch_stats=0, opt_state=8 * gb, grads=4 * gb, temporaries=60 * gb, global_batch=256,
                   mesh=dict(data=8, fsdp=1, model=1))
    lines = [change.flags() for change in plan.advice(too_big, memory=16 * gb, config=config)]
    assert any("--config.mesh.fsdp=8 --config.mesh.data=1" in line for line in lines), lines
    dots = [line for line in lines if "remat=dots" in line]
    assert dots == ["--config.model.image.remat=dots"], lines
    assert "--config.train.batch_size=128" in lines[-1]
    overrides = [flag for line in lines for flag in re.findall(r"--config\.(\S+)=", line)]
    flat = config_checks.flatten(config)
    assert all(key in flat for key in overrides), overrides
