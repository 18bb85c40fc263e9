"""Loads a model to evaluate: from a training checkpoint or a converted checkpoint.

* Training checkpoints (`clippy_jax.checkpoints` describes the layout): `init_from` is a training
  workdir (its newest step is used), its `checkpoints/` folder or one step folder. Only the `params`
  and `batch_stats` (a CNN's BatchNorm statistics) of the saved TrainState are read (orbax partial
  restore), as the variables dict `Loaded.params` (`models.as_variables`). Each step records the
  resolved config that trained it, and the workdir keeps the tokenizer, so nothing else is needed; `model_config` (a
  config file, e.g. `configs/demo.py:size=tiny`) replaces the recorded config, and is needed for steps
  written before configs were recorded. The config's `model` section builds the model and its `data`
  section gives the text length, the image mean / std / size and the demo's evaluation split.
  Loading writes nothing: a missing tokenizer is an error, never regenerated.
* Converted checkpoints (`python -m clippy_jax.convert`): any other directory, read with
  `clippy_jax.convert.load_pretrained(directory) -> (params, model config dict)`; the tokenizer is
  `<directory>/tokenizer.model` unless `tokenizer_path` is given; mean / std come from `data`.
"""

import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import traverse_util

from clippy_jax import checkpoints
from clippy_jax.data import demo_data
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.models import as_variables, build_model, towers


@dataclasses.dataclass
class Loaded:
    model: nn.Module
    params: dict  # variables {'params', 'batch_stats'} of a training checkpoint, params of a converted one
    tokenizer: Tokenizer
    data_config: ml_collections.ConfigDict  # mean, std, tokenizer_path, max_text_length (+ the demo's eval split)
    model_config: ml_collections.ConfigDict
    step: int


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:argument]` -> `get_config(argument)` of that file."""
    path, _, argument = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_model_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"model config {spec!r}: {path} {_missing(path)}; pass a config file, e.g. "
                                "configs/demo.py:size=tiny.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _missing(path: str) -> str:
    return "is a directory, not a file" if os.path.isdir(path) else "does not exist"


def _check_shapes(model: nn.Module, params: dict, model_config: ml_collections.ConfigDict, spec: str,
                  checkpoint: str, recorded: ml_collections.ConfigDict | None) -> None:
    """ValueError naming the settings (or else the parameters) where `spec`'s model differs from the checkpoint's."""
    size = 2 * towers.size_multiple(model.image)  # the parameters' shapes do not depend on the image size
    batch = dict(image=jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                 tokens=jax.ShapeDtypeStruct((1, 8), jnp.int32))
    expected = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(
        lambda batch: model.init(jax.random.key(0), batch)["params"], batch)), sep="/")
    found = traverse_util.flatten_dict(as_variables(params)["params"], sep="/")
    differ = sorted(k for k in set(expected) | set(found)
                    if k not in expected or k not in found or tuple(expected[k].shape) != tuple(found[k].shape))
    if not differ:
        return
    if recorded is not None:
        ours = traverse_util.flatten_dict(model_config.to_dict(), sep=".")
        theirs = traverse_util.flatten_dict(recorded.model.to_dict(), sep=".")
        settings = [f"model.{k}={ours.get(k)!r} (checkpoint: {theirs.get(k)!r})"
                    for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if settings:
            raise ValueError(f"model config {spec!r} does not match the checkpoint {checkpoint}: "
                             f"{', '.join(settings)}; drop --model_config to use the checkpoint's own.")
    first = differ[0]
    shapes = [tuple(tree[first].shape) if first in tree else "absent" for tree in (found, expected)]
    raise ValueError(f"model config {spec!r} does not match the checkpoint {checkpoint}: {len(differ)} parameters "
                     f"differ, e.g. {first} is {shapes[0]} in the checkpoint, {shapes[1]} by the config; pass the "
                     "config that trained it.")


def training_config(step_dir: str, model_config: str = "") -> ml_collections.ConfigDict:
    """The config file `model_config` if given, else the config recorded with the checkpoint step."""
    if model_config:
        return load_config_file(model_config)
    recorded = checkpoints.read_config(step_dir)
    if recorded is None:
        raise ValueError(
            f"{step_dir} was written before checkpoints recorded their config: set config.model_config to the "
            "training config, e.g. --config.model_config=configs/demo.py:size=tiny (Clippy.load(..., "
            "model_config=...))."
        )
    return recorded


def load(config: ml_collections.ConfigDict) -> Loaded:
    """The model, parameters, tokenizer and data settings named by `config.init_from`,
    `config.model_config`, `config.tokenizer_path` and `config.data` (see the module docstring)."""
    if not config.init_from:
        raise ValueError("Set config.init_from to a training workdir, a checkpoint step or a converted checkpoint.")
    if not epath.Path(config.init_from).exists():
        raise FileNotFoundError(
            f"checkpoint {config.init_from} does not exist: train one (`make demo` writes workdirs/demo) or convert "
            "one (python -m clippy_jax.convert).")
    step_dir = checkpoints.find_step_dir(config.init_from)
    data = ml_collections.ConfigDict(config.data.to_dict())
    if step_dir is not None:
        workdir = checkpoints.workdir_of(step_dir)
        train_config = training_config(step_dir, config.model_config)
        data = demo_data.data_paths(train_config, workdir)
        copy = checkpoints.tokenizer_file(workdir)
        if epath.Path(copy).exists():
            data.tokenizer_path = copy
        model_config = train_config.model
        params = checkpoints.restore_variables(step_dir)
        step = int(os.path.basename(step_dir.rstrip("/")))
    else:
        from clippy_jax.convert import load_pretrained  # noqa: PLC0415 (the converters' heavy imports)

        params, converted = load_pretrained(config.init_from)
        missing = sorted({"image_tower", "text_tower"} - set(params))
        if missing:
            raise ValueError(f"{config.init_from} is a partial checkpoint without {missing}; evaluating needs a whole "
                             "model (e.g. python -m clippy_jax.convert --from=open_clip_clippy).")
        model_config = ml_collections.ConfigDict(converted)
        data.tokenizer_path = data.tokenizer_path or os.path.join(config.init_from, "tokenizer.model")
        step = 0
    if config.tokenizer_path:
        data.tokenizer_path = config.tokenizer_path
    if not epath.Path(data.tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer {data.tokenizer_path} {_missing(data.tokenizer_path)}; set "
                                "config.tokenizer_path (Clippy.load(..., tokenizer_path=...)).")
    tokenizer = Tokenizer(data.tokenizer_path, data.max_text_length)
    model = build_model(model_config, tokenizer.vocab_size)
    if step_dir is not None and config.model_config:
        _check_shapes(model, params, model_config, config.model_config, step_dir, checkpoints.read_config(step_dir))
    return Loaded(model, params, tokenizer, data, model_config, step)
