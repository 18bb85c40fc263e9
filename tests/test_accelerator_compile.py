"""The programs that run on accelerators, compiled by the TPU and GPU compilers themselves on this CPU machine
(deviceless ahead-of-time compilation, `clippy_jax.targets`): the demo-size train step (data and data x fsdp
meshes), the evaluators' batch function and the inference function, with the code paths of their target, and
the plan's figures and out-of-memory verdict from that target's compiler."""

import functools
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from clippy_jax import plan, sharding, targets
from clippy_jax.evaluate import engine, segmentation
from clippy_jax.evaluate.loading import load_config_file
from clippy_jax.inference import image_functions
from clippy_jax.models import build_model
from tests.helpers import REPO

TPU = dict(target="TPU v5e", topology="2x2")  # 4 chips
GPU = dict(target="NVIDIA H100", count=4)
TARGETS = {"tpu": TPU, "gpu": GPU}
CUDNN = re.compile(r'custom_call_target="__cudnn\$(fmha\w+)"')


def _config(arg: str = "", **mesh) -> ml_collections.ConfigDict:
    config = load_config_file(os.path.join(REPO, "configs", "demo.py") + (f":{arg}" if arg else ""))
    config.model.dtype = "bfloat16"  # the accelerators' compute dtype (configs/paper.py)
    config.mesh.update(mesh)
    return config


@functools.cache
def _devices(platform: str) -> list[jax.Device]:
    return targets.target_devices(**TARGETS[platform])


def _vocab(config: ml_collections.ConfigDict) -> int:
    return config.data.synthetic.vocab_size


@pytest.mark.parametrize(("mesh", "remat"), [(dict(data=-1), "none"), (dict(data=-1, fsdp=2), "dots")],
                         ids=["data", "data_x_fsdp_remat"])
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_train_step_compiles_for_the_target_with_its_code_paths_and_the_plan_reports_that_compiler(platform, mesh,
                                                                                                  remat):
    config = _config(**mesh)
    config.model.image.remat = config.model.text.remat = remat
    report = plan.make_plan(config, _devices(platform), TARGETS[platform]["target"])
    assert report["compiler"].startswith({"tpu": "XLA:TPU", "gpu": "XLA:GPU"}[platform]), report["compiler"]
    assert report["flops"] > 0 and report["fits"] and report["step_s"] > 0
    hlo = report["hlo"]
    assert "bf16_matmul" not in hlo  # the CPU's dense-layer path (its name is in the CPU program's metadata)
    kernels = CUDNN.findall(hlo)
    if platform == "gpu":
        # Both towers on cuDNN's flash attention, forward and backward: the ViT (65 tokens, padded to 66) plain,
        # T5 with its relative-position bias; one call per layer and direction (remat recomputes the forward).
        image, text = config.model.image.depth, config.model.text.depth
        forward = 1 if remat == "none" else 2
        assert kernels.count("fmhaSoftmax") == forward * image, kernels
        assert kernels.count("fmhaScaleBiasSoftmax") == forward * text, kernels
        assert kernels.count("fmhaSoftmaxBackward") == image, kernels
        assert kernels.count("fmhaScaleBiasSoftmaxBackward") == text, kernels
    else:
        assert not kernels
    if mesh.get("fsdp"):
        assert any("fsdp" in c.axes for c in report["collectives"] if c.kind in ("all-gather", "reduce-scatter"))


def test_the_cpu_program_of_the_same_step_takes_the_cpu_path():
    """The control of the checks above: compiled for host devices, the dense layers are `bf16_matmul` (the tiny
    demo model: the same layers, compiled faster)."""
    config = _config("size=tiny")
    step, state, batch, _ = plan._abstract_step(config, jax.devices()[:4])
    hlo = step.lower(state, batch).compile().as_text()
    assert "bf16_matmul" in hlo and not CUDNN.findall(hlo)


GROUPS = re.compile(r"feature_group_count ?= ?(\d+)")  # HLO and StableHLO text


def _depthwise_channels(state) -> set[int]:
    """The channel counts of the EfficientNet's depthwise kernels [k, k, 1, C] (`conv_dw`)."""
    paths = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return {leaf.shape[-1] for path, leaf in paths if "conv_dw" in jax.tree_util.keystr(path)}


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_cnn_train_step_compiles_for_the_target_with_grouped_convolutions(platform):
    """The EfficientNet tower's step (the tiny demo CNN on data x fsdp) fits its target, and its depthwise
    convolutions stay grouped convolutions there (their channels, as their kernels', split over fsdp; XLA:GPU's
    are cuDNN calls); on the CPU they become shifted multiply-adds (the control: no grouped convolution)."""
    config = _config("tower=efficientnet,size=tiny", data=-1, fsdp=2)
    step, state, batch, _ = plan._abstract_step(config, jax.devices()[:4])
    widths = _depthwise_channels(state)
    assert len(widths) > 3 and {int(g) for g in GROUPS.findall(step.lower(state, batch).as_text())} == {1}
    report = plan.make_plan(config, _devices(platform), TARGETS[platform]["target"], check_advice=False)
    assert report["compiler"].startswith({"tpu": "XLA:TPU", "gpu": "XLA:GPU"}[platform]) and report["fits"]
    grouped = {int(g) for g in GROUPS.findall(report["hlo"])}
    assert {width // config.mesh.fsdp for width in widths} <= grouped, (widths, grouped)  # channels split over fsdp
    assert any("fsdp" in c.axes for c in report["collectives"] if c.kind in ("all-gather", "reduce-scatter"))
    if platform == "gpu":
        assert '__cudnn$convForward' in report["hlo"]
    assert 0 < report["batch_stats"] < report["params"]
    assert f"| BatchNorm statistics | {report['batch_stats']:,} B" in plan.format_plan(report)


def _abstract_params(config: ml_collections.ConfigDict, place) -> dict:
    model = build_model(config.model, _vocab(config))
    images = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
    tokens = jnp.ones((1, config.data.max_text_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), {"image": images, "tokens": tokens})["params"])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), shapes)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_evaluation_and_inference_functions_compile_for_the_target(platform):
    config = _config()
    model = build_model(config.model, _vocab(config))
    side = config.data.image_size
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)), _devices(platform))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = _abstract_params(config, replicated)
    images = jax.ShapeDtypeStruct((8, side, side, 3), jnp.float32, sharding=sharding.batch_sharding(mesh))
    labels = jax.ShapeDtypeStruct((9, config.model.embed_dim), jnp.float32, sharding=replicated)
    evaluate = engine.batch_function(functools.partial(segmentation.predict, model), mesh)
    hlo = evaluate.lower(params, images, labels).compile().as_text()
    assert "bf16_matmul" not in hlo
    assert len(CUDNN.findall(hlo)) == (config.model.image.depth if platform == "gpu" else 0)

    device = _devices(platform)[0]
    on_device = SingleDeviceSharding(device)
    dense, _ = image_functions(model, device)
    photo = jax.ShapeDtypeStruct((1, 96, 128, 3), jnp.float32, sharding=on_device)
    compiled = dense.lower(_abstract_params(config, on_device), photo).compile()
    assert compiled.out_info.shape == (1, 12, 16, config.model.embed_dim)
    assert len(CUDNN.findall(compiled.as_text())) == (config.model.image.depth if platform == "gpu" else 0)


def test_plan_turns_the_tpu_compilers_refusal_into_does_not_fit_with_advice_that_compiles():
    """The tiny demo model at a batch whose activations exceed one v5e chip's 16 GiB: XLA:TPU refuses it; the plan
    reports what the compiler said it needs, and its advice to halve the batch, applied, compiles and fits."""
    config = _config("size=tiny")
    config.model.dtype = "float32"
    config.train.batch_size = 65536
    devices = targets.target_devices("TPU v5e", topology="1x1")
    report = plan.make_plan(config, devices, "TPU v5e", check_advice=False)
    needed, available = report["refused"]
    assert not report["fits"] and needed > available and 15 * 2**30 < available <= 16 * 2**30
    assert report["memory_bytes"] == available and report["peak"] == needed
    halve = [change for change in report["advice"] if "train.batch_size" in change.overrides]
    checked = plan._check(halve[0], config, devices, "TPU v5e")
    assert checked.overrides["train.batch_size"] == 32768 and checked.fits and checked.peak < available
    report["advice"] = [checked]
    text = plan.format_plan(report)
    assert f"does NOT fit: needs {needed / 1e9:.3f} GB" in text and "checked by compiling: fits" in text, text


def test_plan_runs_the_config_checks_of_main_before_compiling():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "clippy_jax.plan", "--config=configs/demo.py:size=tiny",
                             "--target=NVIDIA H100", "--devices=8", "--config.train.batch_size=16",
                             "--config.train.loss_block_size=32"], check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "train.loss_block_size" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(app.UsageError, match="needs --topology"):
        plan._device_count("TPU v5e", 0, "", 1)
    with pytest.raises(app.UsageError, match="--devices is for GPUs"):
        plan._device_count("TPU v5e", 8, "2x2", 1)
    assert plan._device_count("TPU v4", 0, "2x2x4", 2) == 32 and plan._device_count("NVIDIA H100", 0, "", 1) == 8


def test_cloud_tpu_accelerator_types_map_to_their_default_topologies():
    """As Cloud TPU's documentation lists them (v4 and v5p count TensorCores, two per chip; v5e and v6e chips)."""
    expected = {"v4-8": ("TPU v4", "2x2x1"), "v4-32": ("TPU v4", "2x2x4"), "v4-64": ("TPU v4", "2x4x4"),
                "v4-128": ("TPU v4", "4x4x4"), "v4-512": ("TPU v4", "4x8x8"), "v5p-128": ("TPU v5p", "4x4x4"),
                "v5litepod-1": ("TPU v5e", "1x1"), "v5litepod-8": ("TPU v5e", "2x4"),
                "v5litepod-16": ("TPU v5e", "4x4"), "v5litepod-128": ("TPU v5e", "8x16"),
                "v5litepod-256": ("TPU v5e", "16x16"), "v6e-64": ("TPU v6e", "8x8")}
    assert {name: targets.tpu_slice(name) for name in expected} == expected
    for bad in ("v3-8", "v4-24", "v5litepod"):
        with pytest.raises(ValueError, match=f"{bad!r}"):
            targets.tpu_slice(bad)


def test_tpu_topologies_give_one_device_per_chip_and_slices_over_dcn():
    assert len(targets.target_devices("TPU v4", topology="2x2x2")) == 8  # megacore: one device per chip
    two_slices = targets.target_devices("TPU v5e", topology="2x2", slices=2)
    assert [d.slice_index for d in two_slices] == [0] * 4 + [1] * 4
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, model=1)), two_slices)
    assert plan._node_axes(mesh, None) == {"data"}
    gpus = targets.target_devices("NVIDIA A100", count=16)
    assert len(gpus) == 16 and gpus[0].device_kind == "NVIDIA A100-SXM4-80GB"
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=8, model=1)), gpus)
    assert plan._node_axes(mesh, 8) == {"data"}
    np.testing.assert_equal(len({d.id for d in gpus}), 16)


def test_every_launch_plan_of_the_paper_configs_passes_the_checks_on_its_pods_devices():
    """`configs/cc12m.py:pod=NAME` (BENCHMARKS.md, "Pod plans") is a valid config for NAME's device count."""
    from clippy_jax import config_checks

    spec = importlib.util.spec_from_file_location("cc12m", os.path.join(REPO, "configs", "cc12m.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for pod in module.paper.PODS:
        config = module.get_config(f"pod={pod}")
        if pod.startswith(("h", "a")):
            count = int(pod.partition("x")[2])
        else:
            count = targets.topology_chips(targets.tpu_slice(pod)[1])
        config_checks.validate(config, count, paths=False)
        assert config.model.image.remat == module.paper.PODS[pod]["remat"]
    with pytest.raises(ValueError, match="Unknown pod='v9-8'"):
        module.get_config("pod=v9-8")
