"""A converted random-weight timm EfficientNet-B5 gives timm's `forward_features` with both paddings
('pytorch': `efficientnet_b5`, 'same': `tf_efficientnet_b5`), in eval mode and in train mode (batch
statistics and the updated running statistics), at 456x456 and at a non-square size; the
converter's errors name the file, key or shape.

Tolerance: max |ours - timm| <= 1e-4 * max(1, max |timm|), in float32. Random-weight BatchNorm
networks amplify rounding with depth (train mode divides by per-channel batch deviations, some tiny),
and B5 has 116 BatchNorms: at 456x456 in train mode timm in float32 is itself 4.2e-4 (5.7e-5 of the
largest feature) from timm in float64, farther than we are (1.6e-4), so an absolute 1e-4 on features
of magnitude ~7 would test float32 noise, not the model.

Cost: B5 at 456x456 runs in one combination ('same' padding, batch 1, eval and train); the other
combinations run B5 at 100x134 (batch 2), one jitted function per padding returning the eval, train
and frozen-statistics outputs.
"""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util
from safetensors.numpy import save_file

from clippy_jax import config_checks
from clippy_jax.convert.__main__ import cli
from clippy_jax.convert.common import load_pretrained, load_pretrained_batch_stats, unflatten
from clippy_jax.convert.efficientnet import convert_efficientnet
from clippy_jax.models.efficientnet import (
    BatchNorm,
    EfficientNet,
    MBConvBlock,
    efficientnet_config,
    stage_channels,
    stage_repeats,
)
from tests.helpers import REPO

RTOL = 1e-4
# padding: (timm model, [(batch, height, width)]). 456 is B5's resolution; SAME pads asymmetrically where a
# stride-2 layer meets an even side: at 100x134 its five stride-2 layers see 100, 50, 25, 13, 7 x 134, 67, 34, 17, 9.
CASES = {
    "same": ("tf_efficientnet_b5", [(1, 456, 456), (2, 100, 134)]),
    "pytorch": ("efficientnet_b5", [(2, 100, 134)]),
}


def _close(name: str, ours, reference) -> float:
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64)).max())
    scale = max(1.0, float(np.abs(reference).max()))
    print(f"max abs diff {name}: {diff:.2e} (largest |timm| {scale:.2f})")
    assert diff <= RTOL * scale, f"{name}: max abs diff {diff} > {RTOL} * {scale}"
    return diff


def _images(batch: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * width).normal(size=(batch, height, width, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _reference(name: str, images: np.ndarray, seed: int) -> tuple[dict[str, np.ndarray], dict, dict]:
    """timm's model with random BatchNorm affine parameters and running statistics near those of `images`
    (each channel's batch mean and unbiased variance, perturbed by 1%: running statistics of unrelated
    values make a deep random network's eval outputs explode). Returns its state dict, {eval, train:
    NHWC features} and the state dict after one training step on `images`."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.0)
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.normal_(0.0, 0.1, generator=generator)
            norm.momentum = None  # the first training step sets the running statistics to the batch's
        train = model.train().forward_features(_nchw(images))
        batch = [(norm.running_mean.clone(), norm.running_var.clone()) for norm in norms]
        for norm in norms:
            norm.momentum = 0.1
            norm.running_mean.add_(0.01 * norm.running_var.sqrt() * torch.randn(norm.num_features, generator=generator))
            norm.running_var.mul_(torch.empty(norm.num_features).uniform_(0.99, 1.01, generator=generator))
        state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        evaluated = model.eval().forward_features(_nchw(images))
        for norm, (mean, var) in zip(norms, batch, strict=True):  # PyTorch's update, from the same batch statistics
            norm.running_mean.mul_(0.9).add_(0.1 * mean)
            norm.running_var.mul_(0.9).add_(0.1 * var)
    features = {mode: t.permute(0, 2, 3, 1).numpy() for mode, t in (("eval", evaluated), ("train", train))}
    return state, features, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("padding", sorted(CASES))
def test_b5_matches_timm_in_eval_and_train_mode(padding):
    name, sizes = CASES[padding]
    module = EfficientNet(**efficientnet_config("b5"), padding=padding)

    @jax.jit
    def run(variables: dict, images: jax.Array) -> tuple:
        """Eval features, train features with the updated statistics, and training with frozen
        statistics (the eval graph, which XLA shares)."""
        evaluated = module.apply(variables, images)
        train, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
        frozen = module.clone(frozen_batch_stats=True).apply(variables, images, train=True, mutable=["batch_stats"])
        return evaluated, train, updates["batch_stats"], *frozen

    for seed, (batch, height, width) in enumerate(sizes):
        images = _images(batch, height, width)
        state, reference, updated_state = _reference(name, images, seed)
        converted, updated = convert_efficientnet(state, padding), convert_efficientnet(updated_state, padding)
        assert not converted.report, converted.report.describe()
        variables = dict(params=unflatten(converted.params)["image_tower"],
                         batch_stats=unflatten(converted.batch_stats)["image_tower"])
        evaluated, train, updates, frozen, frozen_updates = run(variables, images)
        tag = f"{padding} {batch}x{height}x{width}"
        assert evaluated.shape == (batch, -(-height // 32), -(-width // 32), 2048)
        for mode, ours in (("eval", evaluated), ("train", train)):
            _close(f"{tag} {mode} features", ours, reference[mode])
            _close(f"{tag} {mode} max-pooled", ours.max(axis=(1, 2)), reference[mode].max(axis=(1, 2)))
            _close(f"{tag} {mode} avg-pooled", ours.mean(axis=(1, 2)), reference[mode].mean(axis=(1, 2)))
        assert np.abs(reference["eval"] - reference["train"]).max() > 0.1  # eval reads the running statistics
        ours = traverse_util.flatten_dict(jax.device_get(updates), sep="/")
        assert len(ours) == len(updated.batch_stats)
        keys = sorted(updated.batch_stats)
        _close(f"{tag} running statistics", np.concatenate([ours[k.removeprefix("image_tower/")] for k in keys]),
               np.concatenate([updated.batch_stats[k] for k in keys]))
        np.testing.assert_array_equal(frozen, evaluated)
        jax.tree.map(np.testing.assert_array_equal, frozen_updates["batch_stats"], variables["batch_stats"])


def test_presets_have_timms_layouts():
    """Blocks per stage and channels of B0-B7 as timm builds them (shapes only, no weights touched)."""
    for preset in ("b0", "b3", "b7"):
        with torch.device("meta"):
            model = timm.create_model(f"efficientnet_{preset}", pretrained=False)
        kwargs = efficientnet_config(preset)
        assert stage_repeats(kwargs["depth_multiplier"]) == tuple(len(stage) for stage in model.blocks)
        assert stage_channels(kwargs["width_multiplier"]) == tuple(stage[-1].conv_pwl.out_channels
                                                                    if hasattr(stage[-1], "conv_pwl")
                                                                    else stage[-1].conv_pw.out_channels
                                                                    for stage in model.blocks)
        assert EfficientNet(**kwargs).width == model.num_features


def test_drop_path_drops_whole_residual_branches_per_sample_in_training_only():
    """A block with drop path returns, per sample, its input (branch dropped) or input + branch / keep."""
    block = functools.partial(MBConvBlock, 16, 3, 1, 6, "same", bn_momentum=0.9, bn_epsilon=1e-3)
    x = _images(16, 8, 8)[..., :1].repeat(16, axis=-1)  # [16, 8, 8, 16]
    variables = block(drop_path_rate=0.0).init(jax.random.key(0), x, train=False)

    @jax.jit
    def run(rng):
        apply = lambda rate, train: block(drop_path_rate=rate).apply(  # noqa: E731
            variables, x, train, mutable=["batch_stats"], rngs=dict(dropout=rng))[0]
        return apply(0.5, False), apply(0.0, False), apply(0.5, True), apply(0.0, True)

    evaluated, evaluated_without, dropped, kept = run(jax.random.key(1))
    np.testing.assert_array_equal(evaluated, evaluated_without)
    is_input = np.all(np.isclose(dropped, x, atol=1e-6), axis=(1, 2, 3))
    is_scaled = np.all(np.isclose(dropped, x + (kept - x) / 0.5, atol=1e-5), axis=(1, 2, 3))
    assert np.all(is_input ^ is_scaled) and 0 < is_input.sum() < len(x), (is_input, is_scaled)


def test_batch_norm_refuses_training_on_one_value_per_channel():
    """As PyTorch does: the unbiased running variance would divide by zero."""
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm().init(jax.random.key(0), np.zeros((1, 1, 1, 4), np.float32), use_running_average=False)


@pytest.fixture(scope="module")
def b0_state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _convert(tmp_path, state: dict, *flags: str) -> int:
    path = str(tmp_path / "weights.safetensors")
    save_file(state, path)
    return cli(["--from=timm_efficientnet", f"--input={path}", f"--output={tmp_path / 'out'}", *flags])


def test_the_cli_writes_params_batch_stats_and_the_config(tmp_path, b0_state):
    assert _convert(tmp_path, b0_state, "--padding=same") == 0
    params, model_config = load_pretrained(str(tmp_path / "out"))
    batch_stats = load_pretrained_batch_stats(str(tmp_path / "out"))
    assert model_config["image"] == dict(tower="efficientnet", preset="b0", padding="same")
    np.testing.assert_array_equal(params["image_tower"]["blocks_1_0"]["conv_dw"]["kernel"],
                                  b0_state["blocks.1.0.conv_dw.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(batch_stats["image_tower"]["bn2"]["var"], b0_state["bn2.running_var"])
    variables = jax.eval_shape(EfficientNet(**efficientnet_config("b0")).init, jax.random.key(0), _images(1, 32, 32))
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        shapes = jax.tree.map(lambda v: v.shape, nn.unbox(variables[collection]))
        assert jax.tree.map(np.shape, tree["image_tower"]) == shapes

    # A run initialised from it takes its padding (same parameter shapes, other features) and its tower.
    converted = str(tmp_path / "out")
    config_checks.validate(_demo_config("tower=efficientnet,size=tiny", init=converted), num_devices=1)
    for arg, setting, message in (
            ("tower=efficientnet,size=tiny", "padding='pytorch'", "--config.model.image.padding=same"),
            ("size=tiny", "tower='vit'", "--config.model.image.tower=efficientnet")):
        config = _demo_config(arg, init=converted)
        if "pytorch" in setting:
            config.model.image.padding = "pytorch"
        with pytest.raises(config_checks.ConfigError) as raised:
            config_checks.validate(config, num_devices=1)
        assert str(raised.value).startswith(f"config.model.image.{setting} differs from config.init.image's "
                                            f"({converted}/model_config.json")
        assert message in str(raised.value)


def _demo_config(arg: str, init: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.init.image = init
    return config


@pytest.mark.parametrize(("change", "message"), [
    (dict(padding=None), "needs --padding=pytorch (timm efficientnet_b*) or --padding=same"),
    (dict(drop="blocks.1.0.bn2.running_var"), "missing (in the model, not in the checkpoint): "
                                              "batch_stats/image_tower/blocks_1_0/bn2/var"),
    (dict(drop="conv_head.weight"),
     "missing (in the model, not in the checkpoint): params/image_tower/conv_head/kernel"),
    (dict(add="blocks.1.0.extra.weight"), "unexpected (in the checkpoint, not in the model): blocks.1.0.extra.weight"),
    (dict(shape=("blocks.3.1.conv_pw.weight", (100, 80, 1, 1))),
     "mis-shaped: blocks.3.1.conv_pw.weight has shape (100, 80, 1, 1), the model expects (480, 80, 1, 1)"),
    (dict(shape=("blocks.2.0.se.conv_reduce.weight", (4, 144))),
     "mis-shaped: blocks.2.0.se.conv_reduce.weight has shape (4, 144), the model expects (6, 144, 1, 1)"),
    (dict(shape=("bn1.running_mean", (31,))),
     "mis-shaped: bn1.running_mean (-> batch_stats/image_tower/bn1/mean) has shape (31,), the model expects (32,)"),
    (dict(drop_prefix="blocks.6.0."), "blocks per stage (1, 2, 2, 3, 3, 4) is no B0-B7"),
    (dict(drop_prefix="blocks.5.3."), "blocks per stage (1, 2, 2, 3, 3, 3, 1) is no B0-B7"),
])
def test_key_and_shape_errors_are_named(tmp_path, b0_state, capsys, change, message):
    state = dict(b0_state)
    if "drop" in change:
        del state[change["drop"]]
    if "add" in change:
        state[change["add"]] = np.zeros((3,), np.float32)
    if "shape" in change:
        key, shape = change["shape"]
        state[key] = np.zeros(shape, np.float32)
    if "drop_prefix" in change:
        state = {k: v for k, v in state.items() if not k.startswith(change["drop_prefix"])}
    flags = [] if "padding" in change else ["--padding=pytorch"]
    assert _convert(tmp_path, state, *flags) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_file_errors_name_the_path(tmp_path, capsys):
    garbage, vit = tmp_path / "garbage.pth", tmp_path / "vit.safetensors"
    garbage.write_bytes(b"\x00garbage" * 10)
    save_file({"patch_embed.proj.weight": np.zeros((4, 3, 2, 2), np.float32)}, str(vit))
    cases = [
        (garbage, f"{garbage} cannot be read as a PyTorch pickle"),
        (tmp_path, f"--input={tmp_path} is not a file"),
        (vit, "Not a timm EfficientNet state dict: no 'conv_stem.weight'"),
    ]
    for path, message in cases:
        assert cli(["--from=timm_efficientnet", f"--input={path}", "--padding=same",
                    f"--output={tmp_path / 'out'}"]) == 2
        assert message in capsys.readouterr().err
