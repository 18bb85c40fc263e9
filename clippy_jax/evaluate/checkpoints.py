"""Loads a model to evaluate: from a training workdir's orbax checkpoint or a converted checkpoint.

* Training checkpoints: `init_from` is a training workdir (holding `checkpoints/`), its
  `checkpoints/` folder (the latest step is used) or one step folder `checkpoints/<step>`. Only the
  `params` of the saved TrainState are read (orbax partial restore). The checkpoint does not record
  the model, so `model_config` names the training config it came from, e.g.
  `configs/demo.py:size=tiny`; its `model` section builds the model and its `data` section gives the
  tokenizer, the text length and the image mean / std (the demo's synthetic data, and the tokenizer
  trained on it, are found in - or regenerated into - `<workdir>/data`).
* Converted checkpoints (`python -m clippy_jax.convert`): any other directory, read with
  `clippy_jax.convert.load_pretrained(directory) -> (params, model config dict)`; the tokenizer is
  `<directory>/tokenizer.model` unless `tokenizer_path` is given; mean / std come from `data`.
"""

import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorflow as tf

from clippy_jax.data import demo_data
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.models import build_model

_ORBAX_ITEM = "default"  # the item name CheckpointManager gives a single StandardSave item
# Settings a converted checkpoint's model config may leave out.
MODEL_DEFAULTS = dict(image_pool="max", text_pool="mean", embed_dim=512, temperature_init=0.07, dtype="float32",
                      param_dtype="float32")


@dataclasses.dataclass
class Loaded:
    model: nn.Module
    params: dict
    tokenizer: Tokenizer
    data_config: ml_collections.ConfigDict  # mean, std, tokenizer_path, max_text_length (+ the demo's eval split)
    model_config: ml_collections.ConfigDict
    step: int


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:argument]` -> `get_config(argument)` of that file."""
    path, _, argument = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_model_config", path)
    if module_spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config.model_config={spec!r}: no config file {path!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def orbax_step_dir(init_from: str) -> str | None:
    """The step folder to read for a training workdir / checkpoints folder / step folder, else None."""
    for directory in (os.path.join(init_from, "checkpoints"), init_from):
        if tf.io.gfile.exists(os.path.join(directory, _ORBAX_ITEM)):
            return directory
        if tf.io.gfile.isdir(directory):
            steps = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(directory) if n.rstrip("/").isdigit()]
            steps = [s for s in steps if tf.io.gfile.exists(os.path.join(directory, str(s), _ORBAX_ITEM))]
            if steps:
                return os.path.join(directory, str(max(steps)))
    return None


def restore_params(step_dir: str) -> dict:
    """The `params` subtree of the TrainState saved in an orbax step folder, as numpy arrays."""
    item = os.path.join(step_dir, _ORBAX_ITEM)
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(item).item_metadata.tree
    abstract = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata["params"])}
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    )
    return checkpointer.restore(item, args=args)["params"]


def load(config: ml_collections.ConfigDict) -> Loaded:
    """The model, parameters, tokenizer and data settings named by `config.init_from`,
    `config.model_config`, `config.tokenizer_path` and `config.data` (see the module docstring)."""
    if not config.init_from:
        raise ValueError("Set config.init_from to a training workdir, a checkpoint step or a converted checkpoint.")
    step_dir = orbax_step_dir(config.init_from)
    data = ml_collections.ConfigDict(config.data.to_dict())
    if step_dir is not None:
        if not config.model_config:
            raise ValueError(
                f"{config.init_from} is a training checkpoint, which does not record its model: set "
                "config.model_config to the training config, e.g. --config.model_config=configs/demo.py:size=tiny."
            )
        train_config = load_config_file(config.model_config)
        workdir = os.path.dirname(os.path.dirname(step_dir.rstrip("/")))
        if train_config.data.get("source") == "synthetic":
            data = demo_data.prepare_data(train_config, workdir)
        else:
            keys = ("mean", "std", "tokenizer_path", "max_text_length")
            data.update({k: train_config.data[k] for k in keys if k in train_config.data})
        model_config = train_config.model
        params = restore_params(step_dir)
        step = int(os.path.basename(step_dir.rstrip("/")))
    else:
        from clippy_jax.convert import load_pretrained  # noqa: PLC0415 (the converters' heavy imports)

        params, converted = load_pretrained(config.init_from)
        missing = sorted({"image_tower", "text_tower"} - set(params))
        if missing:
            raise ValueError(f"{config.init_from} is a partial checkpoint without {missing}; evaluating needs a whole "
                             "model (e.g. python -m clippy_jax.convert --from=open_clip_clippy).")
        model_config = ml_collections.ConfigDict({**MODEL_DEFAULTS, **converted})
        data.tokenizer_path = data.tokenizer_path or os.path.join(config.init_from, "tokenizer.model")
        step = 0
    if config.tokenizer_path:
        data.tokenizer_path = config.tokenizer_path
    if not tf.io.gfile.exists(data.tokenizer_path):
        raise FileNotFoundError(f"No tokenizer at {data.tokenizer_path!r}; set config.tokenizer_path.")
    tokenizer = Tokenizer(data.tokenizer_path, data.max_text_length)
    model = build_model(model_config, tokenizer.vocab_size)
    return Loaded(model, params, tokenizer, data, model_config, step)
