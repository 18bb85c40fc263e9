"""Loads a model to evaluate: from a training workdir's orbax checkpoint or a converted checkpoint.

* Training checkpoints: `init_from` is a training workdir (holding `checkpoints/`), its
  `checkpoints/` folder (the latest step is used) or one step folder `checkpoints/<step>`. Only the
  `params` of the saved TrainState are read (orbax partial restore). Training records its resolved
  config in `<workdir>/config.json` and its tokenizer in `<workdir>/tokenizer.model`; `model_config`
  (a config file, e.g. `configs/demo.py:size=tiny`) replaces the recorded config, and is needed for
  workdirs written before it was recorded. The config's `model` section builds the model and its
  `data` section gives the text length, the image mean / std / size and the demo's evaluation split.
  Loading writes nothing: a missing tokenizer is an error, never regenerated.
* Converted checkpoints (`python -m clippy_jax.convert`): any other directory, read with
  `clippy_jax.convert.load_pretrained(directory) -> (params, model config dict)`; the tokenizer is
  `<directory>/tokenizer.model` unless `tokenizer_path` is given; mean / std come from `data`.
"""

import dataclasses
import importlib.util
import json
import os

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorflow as tf

from clippy_jax.data import demo_data
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.models import build_model

CONFIG_FILE = "config.json"  # the resolved training config, written by training
TOKENIZER_FILE = "tokenizer.model"  # a copy of the training tokenizer, written by training
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


def _tuples(value):
    """JSON lists back to the tuples of the config files (flax module attributes must be hashable)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def save_training_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `config` as `<workdir>/config.json`; returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    return path


def training_config(workdir: str, model_config: str = "") -> ml_collections.ConfigDict:
    """The config file `model_config` if given, else the training config recorded in `workdir`."""
    if model_config:
        return load_config_file(model_config)
    path = os.path.join(workdir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(
            f"{workdir} is a training workdir without a recorded config ({CONFIG_FILE}, written by training "
            "since it records one): set config.model_config to the training config, e.g. "
            "--config.model_config=configs/demo.py:size=tiny (Clippy.load(..., model_config=...))."
        )
    with tf.io.gfile.GFile(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


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
    """The `params` subtree of the TrainState saved in an orbax step folder, as numpy arrays. The step
    folder is read as the CheckpointManager wrote it (a composite of one `default` item), so that orbax
    finds the step's metadata where it is."""
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{_ORBAX_ITEM: ocp.PyTreeCheckpointHandler()}))
    tree = checkpointer.metadata(step_dir).item_metadata[_ORBAX_ITEM].tree
    abstract = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])}
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    )
    return checkpointer.restore(step_dir, args=ocp.args.Composite(**{_ORBAX_ITEM: args}))[_ORBAX_ITEM]["params"]


def load(config: ml_collections.ConfigDict) -> Loaded:
    """The model, parameters, tokenizer and data settings named by `config.init_from`,
    `config.model_config`, `config.tokenizer_path` and `config.data` (see the module docstring)."""
    if not config.init_from:
        raise ValueError("Set config.init_from to a training workdir, a checkpoint step or a converted checkpoint.")
    step_dir = orbax_step_dir(config.init_from)
    data = ml_collections.ConfigDict(config.data.to_dict())
    if step_dir is not None:
        workdir = os.path.dirname(os.path.dirname(step_dir.rstrip("/")))
        train_config = training_config(workdir, config.model_config)
        data = demo_data.data_paths(train_config, workdir)
        copy = os.path.join(workdir, TOKENIZER_FILE)
        if tf.io.gfile.exists(copy):
            data.tokenizer_path = copy
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
