"""Validation of a training config before any work (data, initialisation, compilation).

Every check raises `ConfigError` with one message naming the setting, its value and the fix.
"""

import dataclasses
import math
import numbers
import os

import ml_collections
import tensorflow as tf
from absl import logging

from clippy_jax.convert.common import CONFIG_FILE as CONVERTED_CONFIG_FILE
from clippy_jax.convert.common import read_model_config
from clippy_jax.data import eval_datasets, pipeline, sources
from clippy_jax.evaluate import runner
from clippy_jax.models import DTYPES, tower_kwargs
from clippy_jax.models.efficientnet import EFFICIENTNET_PRESETS, PADDINGS, EfficientNet
from clippy_jax.models.layers import REMAT_POLICIES
from clippy_jax.models.pooling import IMAGE_POOLS, TEXT_POOLS, lookup
from clippy_jax.models.t5 import T5Encoder
from clippy_jax.models.towers import IMAGE_TOWERS, has_cls, is_cnn
from clippy_jax.models.vit import VisionTransformer, patch_geometry, patch_grid
from clippy_jax.platforms import ATTENTION_IMPLEMENTATIONS
from clippy_jax.sharding import mesh_shape

# Evaluators that read the held-out split of `data.eval_pattern` (written by the demo for source=synthetic).
EVAL_PATTERN_EVALUATORS = ("synthetic_segmentation",)


class ConfigError(ValueError):
    """A setting that would fail, or silently misbehave, later."""


def _fail(setting: str, value, problem: str, fix: str):
    raise ConfigError(f"config.{setting}={value!r} {problem}; {fix}.")


def _integer(root: ml_collections.ConfigDict, setting: str, minimum: int, fix: str = "") -> int:
    value = _get(root, setting)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(setting, value, "is not a whole number", fix or f"pass an integer >= {minimum}")
    if value < minimum:
        _fail(setting, value, f"must be >= {minimum}", fix or f"pass an integer >= {minimum}")
    return int(value)


def _real(root: ml_collections.ConfigDict, setting: str, low: float, high: float = math.inf,
          low_open: bool = False, high_open: bool = True) -> float:
    value = _get(root, setting)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(setting, value, "is not a finite number", f"pass a number in {interval}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        _fail(setting, value, f"is outside {interval}", f"pass a number in {interval}")
    return float(value)


def _get(config: ml_collections.ConfigDict, setting: str):
    value = config
    for part in setting.split("."):
        value = value[part]
    return value


def _check_data(root: ml_collections.ConfigDict, paths: bool) -> None:
    data = root.data
    known = (*sources.FILE_SOURCES, "tfds")
    if data.source not in known:
        _fail("data.source", data.source, "is not a known source", f"choose one of {known}")
    if data.source == "tfds" and not data.tfds_name:
        _fail("data.tfds_name", data.tfds_name, "is empty but data.source='tfds'", "name a TFDS dataset")
    if paths and data.source not in ("synthetic", "tfds") and not data.train_pattern:
        _fail("data.train_pattern", data.train_pattern, f"is empty but data.source={data.source!r}",
              "pass the shards' glob pattern, e.g. --config.data.train_pattern='/data/cc12m/*.tar'")
    if paths and data.source != "synthetic" and not data.tokenizer_path:
        _fail("data.tokenizer_path", data.tokenizer_path, f"is empty but data.source={data.source!r}",
              "pass a SentencePiece model (e.g. T5's spiece.model)")
    if paths and data.tokenizer_path and not tf.io.gfile.exists(data.tokenizer_path):
        _fail("data.tokenizer_path", data.tokenizer_path, "does not exist",
              "pass the path of a SentencePiece model file (e.g. T5's spiece.model)")
    for setting in ("image_key", "text_key"):
        if not sources.split_keys(data[setting] or ""):
            _fail(f"data.{setting}", data[setting], "names no key", "pass comma-separated keys, e.g. 'jpg,png'")
    sources.parse_text_keys(data.text_key)
    if data.crop not in pipeline.CROPS:
        _fail("data.crop", data.crop, "is not a crop", f"choose one of {pipeline.CROPS}")
    if "patch_size" in data or "patch_stride" in data:
        key = "patch_size" if "patch_size" in data else "patch_stride"
        _fail(f"data.{key}", data[key], "is not a data setting: the pipeline cuts the patches the ViT embeds",
              f"set config.model.image.{key} only (it is read by the pipeline and the model)")
    size = _integer(root, "data.image_size", 1)
    if is_cnn(root.model.image):
        _check_whole_images(root)
    else:
        _check_patches(root, size)
    for setting in ("mean", "std"):
        values = tuple(data[setting])
        if len(values) != 3 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
            _fail(f"data.{setting}", values, "is not 3 finite numbers", "pass one value per RGB channel")
    if min(data.std) <= 0:
        _fail("data.std", tuple(data.std), "has a value <= 0", "pass positive standard deviations")
    _integer(root, "data.max_text_length", 2, "pass at least 2 (one token and the end-of-sequence token)")
    _integer(root, "data.shuffle_buffer", 1, "pass 1 (no shuffling) or more")
    _integer(root, "data.interleave", 1, "pass the number of shards read at once, >= 1")
    if data.prefetch != tf.data.AUTOTUNE:
        _integer(root, "data.prefetch", 0, "pass 0 or more batches (or -1: autotune)")
    if data.get("max_input_wait_seconds") is not None:
        _real(root, "data.max_input_wait_seconds", 0.0, low_open=True)
        _integer(root, "data.max_consecutive_skips", 1)
    if data.source == "synthetic" and "synthetic" in data:
        for setting in ("image_size", "train_examples", "eval_examples", "train_shards", "vocab_size"):
            _integer(root, f"data.synthetic.{setting}", 1)
        _integer(root, "data.synthetic.workers", 0)


def _check_whole_images(root: ml_collections.ConfigDict) -> None:
    """A CNN tower takes whole images: no patch dropping."""
    tower = root.model.image.tower
    if root.data.keep_ratio != 1.0:
        _fail("data.keep_ratio", root.data.keep_ratio, f"drops patches, but config.model.image.tower={tower!r} "
              "takes whole images", "set config.data.keep_ratio=1.0")
    if root.data.keep_patches:
        _fail("data.keep_patches", root.data.keep_patches, f"keeps patches, but config.model.image.tower={tower!r} "
              "takes whole images", "set config.data.keep_patches=0")


def _check_patches(root: ml_collections.ConfigDict, size: int) -> None:
    """The ViT's patch geometry covers the image, and patch dropping keeps at most the patches there are."""
    data = root.data
    _integer(root, "model.image.patch_size", 1)
    patch, stride = patch_geometry(root.model.image)
    if not 1 <= stride <= patch:
        _fail("model.image.patch_stride", stride, f"must be in [1, {patch}] (the patch size)",
              "pass a smaller stride for overlapping patches, or 0 for patches side by side")
    if stride == patch and size % patch:
        _fail("data.image_size", size, f"is not a multiple of config.model.image.patch_size={patch}",
              f"use a multiple of {patch}")
    if size < patch or (size - patch) % stride:
        _fail("data.image_size", size, f"is not covered by {patch}-pixel patches {stride} pixels apart "
              "(config.model.image.patch_size / patch_stride)", f"use {patch} + a multiple of {stride}")
    total = math.prod(patch_grid((size, size), patch, stride))
    if data.keep_patches:
        _integer(root, "data.keep_patches", 0)
        if data.keep_patches > total:
            _fail("data.keep_patches", data.keep_patches, f"exceeds the {total} patches of an image",
                  f"pass 0 (use data.keep_ratio) or at most {total}")
    _real(root, "data.keep_ratio", 0.0, 1.0, low_open=True, high_open=False)


def _check_model(root: ml_collections.ConfigDict) -> None:
    model = root.model
    for setting in ("dtype", "param_dtype"):
        if model[setting] not in DTYPES:
            _fail(f"model.{setting}", model[setting], "is not a supported dtype", f"choose one of {sorted(DTYPES)}")
    head = lookup(IMAGE_POOLS, model.image_pool, "model.image_pool")
    if head.needs_cls and is_cnn(model.image):
        _fail("model.image_pool", model.image_pool, f"reads the CLS token, which config.model.image.tower="
              f"{model.image.tower!r} has none of", "choose a head without it, e.g. 'max' or 'avg'")
    if head.needs_cls and not has_cls(model.image):
        _fail("model.image_pool", model.image_pool, "reads the CLS token, which config.model.image.use_cls_token="
              "False removes", "set config.model.image.use_cls_token=True or choose a head without it")
    lookup(TEXT_POOLS, model.text_pool, "model.text_pool")
    image = model.image
    if not is_cnn(image):
        for setting in ("patch_size", "width", "depth", "num_heads", "mlp_dim"):
            _integer(root, f"model.image.{setting}", 1)
        if image.width % image.num_heads:
            _fail("model.image.num_heads", image.num_heads, f"does not divide config.model.image.width={image.width}",
                  "choose a number of heads that divides the width")
    for setting in ("embed_dim", "depth", "num_heads", "head_dim", "mlp_dim"):
        _integer(root, f"model.text.{setting}", 1)
    _integer(root, "model.text.vocab_size", 0, "pass 0 (the tokenizer's size) or the embedding table's size")
    _integer(root, "model.embed_dim", 1)
    _real(root, "model.temperature_init", 0.0, low_open=True)
    towers = (("text", T5Encoder),) if is_cnn(image) else (("image", VisionTransformer), ("text", T5Encoder))
    for tower, module in towers:  # its defaults where the config is silent
        remat, attention = model[tower].get("remat", module.remat), model[tower].get("attention", module.attention)
        if remat != "none" and remat not in REMAT_POLICIES:
            _fail(f"model.{tower}.remat", remat, "is not a remat policy",
                  f"choose 'none' or one of {sorted(REMAT_POLICIES)}")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            _fail(f"model.{tower}.attention", attention, "is not an attention kernel",
                  f"choose one of {ATTENTION_IMPLEMENTATIONS}")
    grid = image.get("posemb_grid")
    if grid is not None and (len(grid) != 2 or min(grid) < 1):
        _fail("model.image.posemb_grid", tuple(grid), "is not two positive sizes", "pass (rows, columns)")


def _check_image_tower(root: ml_collections.ConfigDict) -> None:
    """The tower of `model.image` (before its preset is expanded) and, for a CNN, its settings by name."""
    image = root.model.image
    tower = image.get("tower", "vit")
    if tower not in IMAGE_TOWERS:
        _fail("model.image.tower", tower, "is not an image tower", f"choose one of {IMAGE_TOWERS}")
    if tower == "vit":
        return
    accepted = {f.name for f in dataclasses.fields(EfficientNet)} - {"parent", "name", "dtype", "param_dtype"}
    accepted |= {"tower", "preset"}
    for key in image:
        if key not in accepted:
            _fail(f"model.image.{key}", image[key], f"is not a setting of config.model.image.tower={tower!r}, which "
                  "takes whole images (no patches, position embeddings or CLS token)",
                  f"remove it; the CNN's settings are {sorted(accepted)}")
    if "preset" in image and image.preset not in EFFICIENTNET_PRESETS:
        _fail("model.image.preset", image.preset, "is not an EfficientNet preset",
              f"choose one of {sorted(EFFICIENTNET_PRESETS)}")
    if image.get("padding", EfficientNet.padding) not in PADDINGS:
        _fail("model.image.padding", image.padding, "is not a padding", f"choose one of {PADDINGS}")
    if "drop_path_rate" in image:
        _real(root, "model.image.drop_path_rate", 0.0, 1.0)
    if not isinstance(image.get("frozen_batch_stats", False), bool):
        _fail("model.image.frozen_batch_stats", image.frozen_batch_stats, "is not a boolean", "pass True or False")


def _check_optim(root: ml_collections.ConfigDict) -> None:
    _real(root, "optim.learning_rate", 0.0, low_open=True)
    _integer(root, "optim.warmup_steps", 0)
    _real(root, "optim.weight_decay", 0.0)
    _real(root, "optim.grad_clip_norm", 0.0, low_open=True)
    _real(root, "optim.b1", 0.0, 1.0)
    _real(root, "optim.b2", 0.0, 1.0)
    _real(root, "optim.eps", 0.0, low_open=True)
    _integer(root, "optim.grad_accum_steps", 1, "pass 1 (no accumulation) or more")


def _check_train(root: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    config, train = root, root.train
    _integer(root, "train.steps", 1)
    batch = _integer(root, "train.batch_size", 1)
    for setting in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _integer(root, f"train.{setting}", 1)
    _real(root, "train.max_logit_scale", 0.0, low_open=True)
    _integer(root, "train.loss_block_size", 0)
    _integer(root, "train.profile_steps", 0)
    _integer(root, "train.profile_first_step", 0)
    if train.on_nonfinite not in ("stop", "skip"):
        _fail("train.on_nonfinite", train.on_nonfinite, "is not a policy", "choose 'stop' or 'skip'")
    data, fsdp, _ = mesh_shape(config.mesh, num_devices)
    if batch % (data * fsdp):
        _fail("train.batch_size", batch, f"is not divisible by the {data * fsdp} data-parallel devices "
              f"(mesh data={data} x fsdp={fsdp} of {num_devices} devices)", f"use a multiple of {data * fsdp}")
    if train.loss_block_size and IMAGE_POOLS[config.model.image_pool].text_conditioned:
        _fail("train.loss_block_size", train.loss_block_size,
              f"needs the full similarity matrix, which config.model.image_pool={config.model.image_pool!r} "
              "pools per text", "set config.train.loss_block_size=0")
    if train.loss_block_size and batch % train.loss_block_size:
        _fail("train.loss_block_size", train.loss_block_size, f"does not divide config.train.batch_size={batch}",
              "choose a divisor of the batch size")
    if batch % process_count:
        _fail("train.batch_size", batch, f"is not divisible by the {process_count} processes",
              f"use a multiple of {process_count}")


def _check_eval(root: ml_collections.ConfigDict) -> None:
    config = root
    _integer(root, "eval.every_steps", 0, "pass 0 (only after training) or an interval >= 1")
    _integer(root, "eval.batch_size", 1)
    _integer(root, "eval.num_overlays", 0)
    _integer(root, "eval.max_examples", 0, "pass 0 (every example) or a positive count")
    try:
        tasks = runner.resolve_tasks(config)
    except ValueError as error:
        raise ConfigError(f"config.eval.evaluators={tuple(config.eval.evaluators)!r}: {error}") from None
    for name, task in tasks:
        if task.kind in EVAL_PATTERN_EVALUATORS:
            if config.data.source != "synthetic" and not config.data.eval_pattern:
                _fail("data.eval_pattern", config.data.eval_pattern,
                      f"is empty but config.eval.evaluators names {name!r}, which reads it",
                      "pass the held-out shards' pattern or leave the evaluator out "
                      "(--config.eval.evaluators='()')")
            if config.data.eval_pattern and not tf.io.gfile.glob(config.data.eval_pattern):
                _fail("data.eval_pattern", config.data.eval_pattern, f"matches no files (read by {name!r})",
                      "fix the pattern or leave the evaluator out")
        elif "dataset" in task and task.dataset not in eval_datasets.BUILDERS:
            _fail(f"eval.tasks.{name}.dataset", task.dataset, "is not an evaluation dataset",
                  f"choose one of {sorted(eval_datasets.BUILDERS)}")


def _check_init(init: ml_collections.ConfigDict, image: ml_collections.ConfigDict) -> None:
    """`init.*` name converted checkpoints; an image tower's settings that keep the parameters' shapes but change
    what they compute (the tower, a CNN's padding) must be the converted checkpoint's (its `model_config.json`)."""
    for tower in ("image", "text"):
        source = init[tower]
        if source is None:
            raise ConfigError(f"config.init.{tower} is required: a directory written by `python -m clippy_jax.convert` "
                              f"or 'random'; pass --config.init.{tower}=...")
        if source != "random" and not tf.io.gfile.isdir(source):
            _fail(f"init.{tower}", source, "is not a directory",
                  "pass a directory written by `python -m clippy_jax.convert`, or 'random'")
    if init.image == "random":
        return
    try:
        converted = read_model_config(init.image).get("image")
    except FileNotFoundError:  # named when the checkpoint is loaded
        return
    if not converted:
        return
    path = os.path.join(init.image, CONVERTED_CONFIG_FILE)
    for key, default, alternative in (("tower", "vit", "an image checkpoint of that tower"),
                                      ("padding", EfficientNet.padding, "weights converted with that --padding")):
        ours, theirs = image.get(key, default), converted.get(key)
        if theirs is not None and ours != theirs:
            _fail(f"model.image.{key}", ours, f"differs from config.init.image's ({path}: {key}={theirs!r})",
                  f"pass --config.model.image.{key}={theirs}, or {alternative}")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, paths: bool = True) -> None:
    """Raises ConfigError for settings that would fail (or silently misbehave) later; `paths=False` leaves out
    the data, tokenizer and initialisation paths (for `clippy_jax.plan`, which reads none of them)."""
    root = ml_collections.ConfigDict(config.to_dict())  # with the model presets expanded
    try:
        _check_image_tower(root)
        root.model.image, root.model.text = tower_kwargs(config.model.image, config.model.text)
        _integer(root, "seed", 0)
        _check_data(root, paths)
        _check_model(root)
        _check_optim(root)
        _check_train(root, num_devices, process_count)
        _check_eval(root)
        if paths:
            _check_init(root.init, root.model.image)
    except ConfigError:
        raise
    except ValueError as error:  # the registries' and the mesh's own checks name their setting
        raise ConfigError(str(error)) from None
    except (AttributeError, KeyError) as error:  # a locked ConfigDict names the missing key
        raise ConfigError(f"The config lacks a setting ({error}); the configs in configs/ list every setting, "
                          "start from one of them.") from None


def check_vocab(config: ml_collections.ConfigDict, tokenizer_size: int) -> None:
    """`model.text.vocab_size` (0: the tokenizer's) must hold every token id of the tokenizer."""
    vocab = config.model.text.get("vocab_size") or 0
    if vocab and vocab < tokenizer_size:
        _fail("model.text.vocab_size", vocab, f"is smaller than the tokenizer's {tokenizer_size} tokens "
              f"({config.data.tokenizer_path or 'the demo tokenizer'})",
              f"pass 0 (the tokenizer's size) or at least {tokenizer_size}")


# Settings a resumed run must share with the run that wrote the workdir's checkpoints: they shape the
# parameters and optimiser state, or the input iterator state.
RESUME_FIXED = ("seed", "model.", "optim.grad_accum_steps", "train.batch_size", "data.source", "data.image_size",
                "data.keep_ratio", "data.keep_patches", "data.max_text_length",
                "data.shuffle_buffer", "data.interleave", "data.prefetch")
# Settings whose change is reported but allowed (e.g. a lower learning rate after a divergence).
RESUME_REPORTED = ("optim.", "data.")


def check_resume(settings: dict, saved: dict | None, workdir: str, workdir_step: int, steps: int) -> None:
    """Compares the flattened config with the one the workdir's checkpoints were written with.

    Raises ConfigError naming every differing setting of `RESUME_FIXED` with both values, or a
    `train.steps` below the workdir's step; logs the other differences of `RESUME_REPORTED`.
    """
    if steps < workdir_step:
        _fail("train.steps", steps, f"is below the step {workdir_step} that {workdir} has reached",
              f"pass --config.train.steps >= {workdir_step} to continue it, or a new --workdir")
    if saved is None:
        return
    changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))

    def describe(keys: list[str]) -> str:
        return ", ".join(f"config.{k}={saved.get(k, '<unset>')!r} -> {settings.get(k, '<unset>')!r}" for k in keys)

    fixed = [k for k in changed if k.startswith(RESUME_FIXED)]
    if fixed:
        raise ConfigError(f"The settings differ from those of the checkpoints in {workdir} (written -> now): "
                          f"{describe(fixed)}; pass the written values to resume, or a new --workdir.")
    reported = [k for k in changed if k.startswith(RESUME_REPORTED)]
    if reported:
        logging.warning("Resuming %s with changed settings (written -> now): %s.", workdir, describe(reported))


def _mismatch_settings(model: ml_collections.ConfigDict, key: str, saved: tuple, expected: tuple) -> list[str]:
    """The integer settings of the array's tower (`model.image`, `model.text`, else `model`) whose value is a
    dimension in which the config's shape `expected` differs from the checkpoint's `saved`."""
    tower = next((t for t in ("image", "text") if f"/{t}_" in f"/{key}"), None)
    settings = flatten(model[tower], f"model.{tower}.") if tower else {
        f"model.{k}": v for k, v in flatten(model).items() if "." not in k}
    guesses = []
    if len(saved) == len(expected):
        for old, new in zip(saved, expected):
            guesses += [f"config.{k}={v!r} (the checkpoint's {old})" for k, v in settings.items()
                        if old != new and v == new and isinstance(v, int) and not isinstance(v, bool)]
    return guesses


def state_mismatch(config: ml_collections.ConfigDict, error, workdir: str, recorded: bool) -> ConfigError:
    """A ConfigError for a `checkpoints.StateMismatchError`: the settings that likely differ, by the shapes."""
    params = [d for d in error.differences if d[0].startswith("params/")]
    guesses = []
    for key, saved, expected in params:
        if saved is not None and expected is not None:
            guesses += [g for g in _mismatch_settings(ml_collections.ConfigDict(config.model.to_dict()), key,
                                                      saved, expected) if g not in guesses]
    if params:
        what = f"other model settings (likely {' or '.join(guesses)})" if guesses else "other model settings"
    else:
        what = "another optimiser (config.optim)"
    example = "; ".join(f"{key} is {saved and tuple(saved)} there, {expected and tuple(expected)} now"
                        for key, saved, expected in (params or error.differences)[:2])
    why = "" if recorded else " and record no config to compare with (written before configs were recorded)"
    return ConfigError(f"The checkpoints in {workdir} were written with {what}{why}: {example}; pass the settings "
                       "they were trained with to resume, or a new --workdir. Nothing in the workdir was changed.")


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{'train.steps': 6, ...}: the scalar settings, others (tuples, None) as strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out
