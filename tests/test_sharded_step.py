"""The jitted train step gives the same results on one device and on meshes of 8 host devices."""

import contextlib
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from clippy_jax import plan, sharding
from clippy_jax.models import build_model
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import batch_spec, create_train_state, make_train_step
from tests.helpers import REPO

BATCH = 16
# The smallest EfficientNet: one block per stage, B0's channels / 4 (configs/demo.py:tower=efficientnet,size=tiny).
CNN = dict(tower="efficientnet", width_multiplier=0.25, depth_multiplier=0.25, padding="same", drop_path_rate=0.0,
           frozen_batch_stats=False)


def _configs(remat: str = "none", cnn: bool = False):
    vit = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, posemb_grid=(4, 4), use_cls_token=True,
               remat=remat)
    model = ml_collections.ConfigDict(dict(
        image=CNN if cnn else vit,
        text=dict(vocab_size=64, embed_dim=32, depth=2, num_heads=2, head_dim=16, mlp_dim=64,
                  activations=("gelu_tanh", "linear"), remat=remat),
        image_pool="max", text_pool="mean", pool_temperature=0.1, project_image=True, project_text=True,
        embed_dim=16, temperature_init=0.07, dtype="float32",
        param_dtype="float32",
    ))
    optim = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=1, weight_decay=1e-2, grad_clip_norm=1.0,
                                           b1=0.9, b2=0.999, eps=1e-6, grad_accum_steps=1))
    return model, optim


def _batches(steps: int, size: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        tokens = rng.integers(3, 64, (BATCH, 12)).astype(np.int32)
        tokens[:, 8:] = 0
        batches.append(dict(image=rng.normal(size=(BATCH, size, size, 3)).astype(np.float32), tokens=tokens))
    return batches


def _step(mesh_shape: tuple[int, int, int], local_batch: dict, loss_block_size: int = 0, remat: str = "none",
          cnn: bool = False):
    """(jitted step, initial state, mesh) of the test model on the first devices of `mesh_shape`."""
    model_config, optim_config = _configs(remat, cnn)
    model = build_model(model_config)
    tx, schedule = make_optimizer(optim_config, total_steps=10)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, mesh_shape))), devices)
    state, shardings = create_train_state(model, tx, batch_spec(local_batch, jax.process_count()), mesh, seed=0)
    step_fn = make_train_step(model, tx, schedule, shardings, mesh, max_logit_scale=np.log(100.0),
                              loss_block_size=loss_block_size)
    return step_fn, state, mesh


def train(mesh_shape: tuple[int, int, int], steps: int, loss_block_size: int = 0, remat: str = "none",
          cnn: bool = False):
    """Runs `steps` steps on fixed batches; with several processes, each feeds its slice of the batch. The CNN
    sees 64x64 images: a 2x2 last feature map."""
    local = BATCH // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    batches = [{k: v[rows] for k, v in batch.items()} for batch in _batches(steps, 64 if cnn else 32)]
    step_fn, state, mesh = _step(mesh_shape, batches[0], loss_block_size, remat, cnn)
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = step_fn(state, sharding.global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return np.asarray(losses), state


@pytest.fixture(scope="module")
def single_device():
    losses, state = train((1, 1, 1), steps=3)
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize(("mesh_shape", "loss_block_size", "remat"), [
    ((8, 1, 1), 0, "none"), ((2, 4, 1), 0, "none"), ((2, 2, 2), 0, "dots"), ((2, 2, 2), 4, "full")])
def test_meshes_match_one_device(single_device, mesh_shape, loss_block_size, remat):
    """Data / FSDP / tensor-parallel meshes, the blocked loss and the rematerialised towers all equal the
    one-device step without remat."""
    assert jax.device_count() == 8
    losses, state = train(mesh_shape, steps=3, loss_block_size=loss_block_size, remat=remat)
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    params = jax.device_get(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=0), params, ref_params)
    # The step really ran sharded: FSDP and tensor-parallel axes split the parameters.
    kernel = state.params["text_tower"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    assert len(kernel.addressable_shards) == 8


def test_cnn_tower_on_data_x_fsdp_matches_one_device():
    """The EfficientNet tower's step on data=2 x fsdp=4 equals one device: losses, parameters and BatchNorm running
    statistics. Its BatchNorm normalises with the statistics of the global batch (statistics of each device's two
    examples would give other losses and statistics), and its kernels and statistics are sharded over fsdp."""
    ref_losses, ref_state = train((1, 1, 1), steps=2, cnn=True)
    losses, state = train((2, 4, 1), steps=2, cnn=True)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in ((state.params, ref_state.params), (state.batch_stats, ref_state.batch_stats)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), jax.device_get(got),
                     jax.device_get(want))
    head = state.batch_stats["image_tower"]["bn2"]
    assert not np.allclose(jax.device_get(head["var"]), 1.0)  # the steps updated the running statistics
    assert head["var"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    kernel = state.params["image_tower"]["conv_head"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")


def _lowered_step(mesh_shape: tuple[int, int, int], under_mesh: bool):
    """(the step lowered as the train loop does it, or under `jax.set_mesh`; its mesh)."""
    step_fn, state, mesh = _step(mesh_shape, _batches(1)[0])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
             for k, v in batch_spec(_batches(1)[0], 1).items()}
    with jax.set_mesh(mesh) if under_mesh else contextlib.nullcontext():
        return step_fn.lower(state, batch), mesh


@pytest.fixture(scope="module")
def fsdp_step():
    """(the step on data=2 x fsdp=4 lowered outside any mesh context, as the train loop does; its mesh)."""
    return _lowered_step((2, 4, 1), under_mesh=False)


def test_activation_constraints_reach_the_step_however_it_is_lowered(fsdp_step):
    """The train loop lowers its step outside `jax.set_mesh`, where Flax drops `nn.with_logical_constraint`
    silently: the step brings its own mesh, so it holds the towers' activation constraints and compiles to
    the same collectives as under the mesh. (Without them XLA all-reduced activations over `fsdp`: 2.9x the
    fsdp all-reduce bytes of the demo model, BENCHMARKS.md.)"""
    outside, mesh = fsdp_step
    under, _ = _lowered_step((2, 4, 1), under_mesh=True)
    # One constraint per tower layer output at least: [batch, length, embed] activations of 2 + 2 layers.
    assert outside.as_text().count("sharding_constraint") >= 4
    assert outside.as_text().count("sharding_constraint") == under.as_text().count("sharding_constraint")

    def collective_bytes(lowered) -> dict:
        found = plan.collectives(lowered.compile().as_text(), mesh)
        return sorted((c.kind, c.axes, c.bytes, c.count) for c in found)

    assert collective_bytes(outside) == collective_bytes(under)


def test_fsdp_gathers_weights_not_activations_across_data(fsdp_step):
    """On a data x fsdp mesh the step gathers weights within each `fsdp` group, never activations over
    `data` (which crosses the slow links between nodes): T5's token lookup once gathered the whole batch's
    embeddings over `data` (BENCHMARKS.md, pod plan)."""
    lowered, mesh = fsdp_step
    found = plan.collectives(lowered.compile().as_text(), mesh)
    assert any(c.kind == "all-gather" and c.axes == ("fsdp",) for c in found)
    # Over (data, fsdp) the loss gathers the batch's embeddings, as it must; nothing is gathered over `data` alone.
    over_data = [c for c in found if c.kind in ("all-gather", "all-to-all") and c.axes == ("data",)]
    assert not over_data, over_data


def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives) give the 8-device losses."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_sharded_step", f"127.0.0.1:{port}", str(i), str(tmp_path / f"{i}.npy")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output[-3000:]
    expected, _ = train((8, 1, 1), steps=3)
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"{i}.npy"), expected, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # one worker of test_two_processes_match_one_process
    coordinator, process_id, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    np.save(output, train((8, 1, 1), steps=3)[0])
