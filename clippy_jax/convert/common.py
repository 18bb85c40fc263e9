"""Shared machinery of the importers: reading PyTorch-format weights, rule-based key mapping with a
report of missing, unexpected and mis-shaped keys, and the orbax format they write.

A converted checkpoint is a directory with `params/` (an orbax `StandardCheckpointer` save of a
subtree of the `TwoTower` parameters, e.g. only `image_tower`), for a tower with BatchNorm
`batch_stats/` (the same for its `batch_stats` collection), and `model_config.json` (the
`config.model` entries the weights imply, plus the source it came from).
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

PARAMS_DIR = "params"
BATCH_STATS_DIR = "batch_stats"
CONFIG_FILE = "model_config.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# (source key regex, target path template with regex groups, transform of the array).
Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]


@dataclasses.dataclass
class Converted:
    """An importer's result: flat {TwoTower parameter path: array}, the `config.model` entries the
    weights imply, the keys that did not line up, and flat BatchNorm statistics (`batch_stats`)."""

    params: dict[str, np.ndarray]
    model_config: dict
    report: "KeyReport"
    batch_stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def merged(self, other: "Converted") -> "Converted":
        return Converted(
            {**self.params, **other.params},
            {**self.model_config, **other.model_config},
            self.report.merged(other.report),
            {**self.batch_stats, **other.batch_stats},
        )


def same(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> Flax kernel [in, out]."""
    return x.T


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys do not match the model's parameters."""


@dataclasses.dataclass
class KeyReport:
    """Keys that did not line up: sources nothing consumed, targets nothing wrote, wrong shapes."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def merged(self, other: "KeyReport") -> "KeyReport":
        return KeyReport(
            self.missing + other.missing, self.unexpected + other.unexpected, self.misshaped + other.misshaped
        )

    def describe(self) -> str:
        lines = [f"missing (in the model, not in the checkpoint): {k}" for k in self.missing]
        lines += [f"unexpected (in the checkpoint, not in the model): {k}" for k in self.unexpected]
        lines += [f"mis-shaped: {k} has shape {got}, the model expects {want}" for k, got, want in self.misshaped]
        return "\n".join(lines)

    def check(self, strict: bool, what: str) -> None:
        """Raises CheckpointMismatchError naming every key unless all matched or `strict` is off
        (then the mismatches are logged and the matching keys are used)."""
        if not self:
            return
        if strict:
            raise CheckpointMismatchError(
                f"{what} does not match the model:\n{self.describe()}\n"
                "Refusing a partial load (pass --allow-partial / strict=False to load the matching keys only)."
            )
        logging.warning("Partial load of %s:\n%s", what, self.describe())


class ConvertError(ValueError):
    """A file or folder that cannot be converted; the message names the path and what was expected."""


def read_state_dict(path: str) -> dict:
    """Reads `.safetensors` (numpy only, no torch) or a PyTorch pickle (`.pt/.pth/.bin/.ckpt`, torch
    imported lazily). Returns the raw (possibly nested) mapping with numpy leaves."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path} is not a file; expected a weights file (.safetensors or "
                           f"{', '.join(TORCH_SUFFIXES)}).")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415 (optional dependency)

        try:
            contents = dict(load_file(path))
        except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
            raise ConvertError(f"{path} cannot be read as safetensors: {error}") from error
        return _non_empty(contents, path)
    if not path.endswith(TORCH_SUFFIXES):
        raise ConvertError(f"Unknown weights format {path!r}; expected .safetensors or one of {TORCH_SUFFIXES}.")
    try:
        import torch  # noqa: PLC0415 (only PyTorch pickles need it)
    except ImportError as e:
        raise ImportError(
            f"Reading the PyTorch pickle {path} needs torch (`pip install torch`, CPU build is enough), "
            "or convert it to .safetensors first."
        ) from e
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 (pickle, zip and torch errors)
        raise ConvertError(f"{path} cannot be read as a PyTorch pickle: {type(error).__name__}: {error}") from error
    if not isinstance(contents, Mapping):
        raise ConvertError(f"{path} holds a {type(contents).__name__}, not a state dict (a mapping of names to "
                           "tensors).")

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()
        if isinstance(x, Mapping):
            return {k: to_numpy(v) for k, v in x.items()}
        return x

    return _non_empty(to_numpy(contents), path)


def _non_empty(contents: dict, path: str) -> dict:
    if not contents:
        raise ConvertError(f"{path} holds no tensors.")
    return contents


def read_json(path: str) -> dict:
    """A JSON object file, with errors that name it."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path} is missing; expected a JSON file there.")
    try:
        with open(path) as f:
            contents = json.load(f)
    except ValueError as error:
        raise ConvertError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(contents, dict):
        raise ConvertError(f"{path} holds a JSON {type(contents).__name__}, not an object.")
    return contents


def select(contents: Mapping, containers: Iterable[str], prefixes: Iterable[str]) -> dict[str, np.ndarray]:
    """Unwraps the first of `containers` found (e.g. a training checkpoint's `state_dict`, DINO's
    `teacher`), repeatedly, and strips any of `prefixes` (e.g. DDP's `module.`) from the keys."""
    containers, prefixes = tuple(containers), tuple(prefixes)
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for name in containers:
            if isinstance(contents.get(name), Mapping):
                contents, unwrapped = contents[name], True
                break
    state = {}
    for key, value in contents.items():
        if not isinstance(value, np.ndarray | np.generic):
            continue  # epoch counters, argument namespaces, optimiser state of training checkpoints
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        state[key] = np.asarray(value)
    return state


def map_state(
    state: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    expected: Mapping[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    source_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, np.ndarray], KeyReport]:
    """Applies every matching rule to every source key.

    A key may feed several targets (e.g. timm's fused qkv). Keys matching `ignore` are dropped on
    purpose (classifier heads, T5's decoder). Keys matching a pattern of `source_shapes` must have
    that shape before any transform (slices would hide a wrong one), and a transform that cannot
    reshape its key reports it as mis-shaped. Returns flat {target path: array} and the report.
    """
    rules, ignore = list(rules), list(ignore)
    out: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    report = KeyReport()
    for key, value in sorted(state.items()):
        want = next((shape for pattern, shape in (source_shapes or {}).items() if re.fullmatch(pattern, key)), None)
        if want is not None and tuple(value.shape) != tuple(want):
            report.misshaped.append((key, tuple(value.shape), tuple(want)))
            continue
        matched = False
        for pattern, target, transform in rules:
            match = re.fullmatch(pattern, key)
            if match is None:
                continue
            matched = True
            path = match.expand(target)
            try:
                array = transform(value)
            except ValueError:  # a reshape of a wrongly shaped key
                report.misshaped.append((f"{key} (-> {path}, cannot be reshaped)", tuple(value.shape),
                                         tuple(expected.get(path, ()))))
                continue
            if path in out and not np.array_equal(out[path], array):
                raise CheckpointMismatchError(f"Checkpoint keys {sources[path]} and {key} both give {path} but differ.")
            out[path], sources[path] = array, key
        if not matched and not any(re.fullmatch(pattern, key) for pattern in ignore):
            report.unexpected.append(key)
    report.unexpected += [f"{sources[p]} (-> {p}, not in the model)" for p in sorted(set(out) - set(expected))]
    report.missing = sorted(set(expected) - set(out))
    report.misshaped += [
        (f"{sources[p]} (-> {p})", tuple(out[p].shape), tuple(expected[p]))
        for p in sorted(set(out) & set(expected))
        if tuple(out[p].shape) != tuple(expected[p])
    ]
    return {k: v for k, v in out.items() if k in expected and tuple(v.shape) == tuple(expected[k])}, report


def expected_shapes(module: nn.Module, *args, prefix: str = "", **kwargs) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of `module`'s parameters, from `jax.eval_shape` (no memory used)."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)["params"])
    flat = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
    return {f"{prefix}{k}": tuple(v.shape) for k, v in flat.items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32) for k, v in flat.items()})


def save_pretrained(
    directory: str, params: Mapping, model_config: Mapping, source: Mapping, batch_stats: Mapping | None = None
) -> None:
    """Writes `params/` (orbax), `batch_stats/` when given (non-empty), and `model_config.json` under `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
        if batch_stats:
            checkpointer.save(os.path.join(directory, BATCH_STATS_DIR), batch_stats, force=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dict(model=model_config, source=dict(source)), f, indent=2, sort_keys=True)


def read_model_config(directory: str) -> dict:
    """The `config.model` entries a converted checkpoint implies (its `model_config.json`)."""
    config_path = epath.Path(directory) / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} is not a converted checkpoint (no {CONFIG_FILE}); see python -m "
                                "clippy_jax.convert.")
    return json.loads(config_path.read_text())["model"]


def load_pretrained(directory: str) -> tuple[dict, dict]:
    """Reads a converted checkpoint: (params subtree as numpy arrays, the `config.model` entries it implies)."""
    directory = os.path.abspath(directory)
    model_config = read_model_config(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(directory, PARAMS_DIR))
    return jax.tree.map(np.asarray, params), model_config


def load_pretrained_batch_stats(directory: str) -> dict:
    """A converted checkpoint's BatchNorm statistics subtree (numpy), {} for towers without BatchNorm;
    `merge_pretrained(batch_stats, subtree)` puts them into the model's `batch_stats` collection."""
    path = os.path.join(os.path.abspath(directory), BATCH_STATS_DIR)
    if not os.path.isdir(path):
        return {}
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.tree.map(np.asarray, checkpointer.restore(path))


def merge_pretrained(params: Mapping, pretrained: Mapping, strict: bool = True) -> dict:
    """Returns `params` with the leaves of `pretrained` (a subtree such as {'image_tower': ...}) put in.

    Within the top-level entries that `pretrained` provides, every model parameter must be present
    with the same shape and no extra keys may appear; otherwise CheckpointMismatchError names them,
    unless `strict=False`, which loads the matching keys and keeps the rest as initialised. Leaves
    take the dtype (and, for jax.Arrays, the sharding) of the parameter they replace; logically
    partitioned (boxed) parameters from `model.init` are unboxed.
    """
    flat_params = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    flat_pretrained = traverse_util.flatten_dict(pretrained, sep="/")
    covered = {path.split("/")[0] for path in flat_pretrained}
    report = KeyReport(
        missing=sorted(p for p in flat_params if p.split("/")[0] in covered and p not in flat_pretrained),
        unexpected=sorted(set(flat_pretrained) - set(flat_params)),
        misshaped=[
            (p, tuple(np.shape(v)), tuple(flat_params[p].shape))
            for p, v in sorted(flat_pretrained.items())
            if p in flat_params and tuple(np.shape(v)) != tuple(flat_params[p].shape)
        ],
    )
    report.check(strict, "The pretrained checkpoint")
    bad = {p for p, _, _ in report.misshaped}
    merged = dict(flat_params)
    for path, value in flat_pretrained.items():
        if path not in flat_params or path in bad:
            continue
        target = flat_params[path]
        value = np.asarray(value, dtype=target.dtype)
        merged[path] = jax.device_put(value, target.sharding) if isinstance(target, jax.Array) else value
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})
