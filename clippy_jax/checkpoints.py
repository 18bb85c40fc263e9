"""The layout of a training workdir's checkpoints: written by training, read by evaluation and inference.

    <workdir>/checkpoints/<step>/default/     the TrainState (orbax StandardSave)
    <workdir>/checkpoints/<step>/config/      the resolved config that trained it (orbax JsonSave)
    <workdir>/checkpoints/data/<step>/process_<i>/iterator.npz   each process's input position
    <workdir>/tokenizer.model                 a copy of the tokenizer it trained with

Orbax writes each step atomically (a step directory appears only once complete, with its config), so a
run killed mid-save resumes from the previous complete step, and a step whose bytes are bad (a missing
or undecodable file: `unreadable_reason`) is renamed `<step>.unreadable` for the one before it. Nothing
else sets a step aside: an interrupt, a config whose shapes differ, an out-of-memory or a file system
that does not answer leave the workdir as it is.

The input iterator state of every process is written synchronously before the step's (asynchronous)
orbax save starts, and pruned with the steps orbax drops. Steps written before the config was recorded
have no `config/` item: they load with a config file (`model_config`), and resume only into the same
shapes (`StateMismatchError` otherwise).
"""

import dataclasses
import errno
import functools
import itertools
import json
import os
import time
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from clippy_jax.deadlines import call_with_deadline

if TYPE_CHECKING:  # reading checkpoints (evaluation, inference) needs neither tf.data nor TensorFlow
    from clippy_jax.data.pipeline import InputIterator

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "default"  # the name CheckpointManager gives a single item, kept for older checkpoints
CONFIG_ITEM = "config"
TOKENIZER_FILE = "tokenizer.model"
# Attempts at a checkpoint read that fails transiently (`_transient`), and the seconds before the first retry.
_READ_ATTEMPTS = 3
_RETRY_SECONDS = 2.0
# TensorStore's status codes (the start of its errors' messages) that mean the stored bytes are bad, or
# that the storage did not answer.
_BAD_BYTES_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
_TRANSIENT_ERRNOS = (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET)


class UnreadableCheckpointError(ValueError):
    """A checkpoint step's bytes are bad: a file is missing, truncated or undecodable."""


class CheckpointReadError(OSError):
    """Reading a checkpoint kept failing for a reason that says nothing about its bytes (the file system)."""


class StateMismatchError(ValueError):
    """A checkpoint's arrays differ in name or shape from the state the config builds."""

    def __init__(self, step: int, path: str, saved: dict[str, tuple], expected: dict[str, tuple]):
        self.step, self.path, self.saved, self.expected = step, path, saved, expected
        self.differences = [(key, saved.get(key), expected.get(key)) for key in sorted(set(saved) | set(expected))
                            if saved.get(key) != expected.get(key)]
        shown = "; ".join(f"{key}: {_describe_shape(old)} in the checkpoint, {_describe_shape(new)} now"
                          for key, old, new in self.differences[:4])
        super().__init__(f"Checkpoint step {step} at {path} holds other arrays than the config builds "
                         f"({len(self.differences)} differ, e.g. {shown})")


def _describe_shape(shape: tuple | None) -> str:
    return "absent" if shape is None else str(tuple(shape))


def _key_name(entry) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _restore_target(abstract_state, metadata):
    """`abstract_state`; for a TrainState and a step (its tree `metadata`) saved before the TrainState held
    BatchNorm statistics (of a model without them, as `_check_shapes` ensured), its other fields as a dict."""
    if "batch_stats" in metadata or not dataclasses.is_dataclass(abstract_state):
        return abstract_state
    return {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
            if f.name != "batch_stats"}


def _stored_shape(leaf) -> tuple:
    """The shape an array is stored with: a typed PRNG key array as its raw key data."""
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _shapes(tree) -> dict[str, tuple]:
    """{'params/image_tower/embedding/kernel': shape} of a state, abstract state or orbax tree metadata."""
    return {"/".join(map(_key_name, path)): _stored_shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _chain(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _tensorflow_error(error: BaseException, names: tuple[str, ...]) -> bool:
    """Whether `error` is one of TensorFlow's errors `names` (matched by name: checkpoints load without TensorFlow)."""
    return type(error).__module__.startswith("tensorflow") and type(error).__name__ in names


def unreadable_reason(error: BaseException) -> str | None:
    """Why a checkpoint's bytes are bad, if `error` (or an error it came from) says so; None otherwise."""
    for cause in _chain(error):
        if isinstance(cause, UnicodeDecodeError):
            return f"not UTF-8 text: {_first_line(cause)}"
        if isinstance(cause, json.JSONDecodeError):
            return f"not valid JSON: {_first_line(cause)}"
        if isinstance(cause, FileNotFoundError | zipfile.BadZipFile | EOFError) or _tensorflow_error(
                cause, ("NotFoundError", "DataLossError")):
            return _first_line(cause)
        if isinstance(cause, ValueError) and str(cause).startswith(_BAD_BYTES_CODES):
            return _first_line(cause)
    return None


def _transient(error: BaseException) -> bool:
    """Whether `error` says that the storage did not answer (worth a retry), not that the bytes are bad."""
    for cause in _chain(error):
        if isinstance(cause, TimeoutError | ConnectionError) or _tensorflow_error(
                cause, ("UnavailableError", "DeadlineExceededError")):
            return True
        if isinstance(cause, OSError) and cause.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(cause, ValueError) and str(cause).startswith(_TRANSIENT_CODES):
            return True
    return False


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(workdir), str(step))


def tokenizer_file(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_FILE)


def _tuples(value):
    """JSON lists back to the tuples of the config files (flax module attributes must be hashable)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _json_config(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json(sort_keys=True))


class Checkpointer:
    """Saves and restores the TrainState, its config and the input iterator's position in a workdir."""

    def __init__(self, workdir: str, save_every: int, keep: int, wait_seconds: float | None):
        """`wait_seconds`: how long the small reads (a step's metadata and recorded config) may take before
        they count as a file system that does not answer."""
        self.directory, self.wait_seconds = checkpoint_dir(workdir), wait_seconds
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=True, create=True
            ),
            # Named items, so that orbax does not take the `default` item for its single-item mode.
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()},
        )

    def _data_dir(self, step: int) -> str:
        return os.path.join(self.directory, "data", str(step), f"process_{jax.process_index()}")

    def steps(self) -> list[int]:
        """The complete steps in the directory, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def newest_config(self, interrupted: Callable[[], bool]) -> tuple[int, ml_collections.ConfigDict | None] | None:
        """(the newest step, the config recorded with it: None for a step written before configs were
        recorded); a step whose recorded config is unreadable is set aside for the one before it. None if
        there is no step."""
        for step in self.steps():
            path = os.path.join(self.directory, str(step))
            try:
                return step, self._read(step, "its recorded config", functools.partial(read_config, path), interrupted,
                                        limited=True)
            except UnreadableCheckpointError as error:
                self._set_aside(step, error)
        return None

    def restore(self, abstract_state, iterator: "InputIterator | None", interrupted: Callable[[], bool]):
        """Restores the newest readable step into `abstract_state`'s shapes and shardings; None if none.

        A step whose bytes are bad (`unreadable_reason`: a missing or undecodable file) is reported by
        path and renamed `<step>.unreadable` (never deleted), and the step before it is tried. Anything
        else leaves the workdir as it is: a state whose shapes differ from `abstract_state`'s raises
        StateMismatchError; a read that fails transiently is retried, then raises CheckpointReadError;
        an interrupt (`interrupted()` true, KeyboardInterrupt) and any other error propagate.
        """
        for step in self.steps():
            try:
                metadata = self._read(step, "its metadata", functools.partial(self._check_shapes, step, abstract_state),
                                      interrupted, limited=True)
                target = _restore_target(abstract_state, metadata)
                args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
                restored = self._read(step, "the TrainState", functools.partial(self.manager.restore, step, args=args),
                                      interrupted)
                if iterator is not None:
                    self._read(step, "the input iterator state",
                               functools.partial(self._restore_iterator, step, iterator), interrupted)
            except UnreadableCheckpointError as error:
                self._set_aside(step, error)
                continue
            logging.info("Resumed from checkpoint step %d in %s.", step, self.directory)
            state = restored[STATE_ITEM]
            return state if target is abstract_state else abstract_state.replace(**state)
        return None

    def _read(self, step: int, what: str, read: Callable, interrupted: Callable[[], bool], limited: bool = False):
        """read(), classifying its failure: bad bytes -> UnreadableCheckpointError; a transient error (or, if
        `limited`, no answer within `wait_seconds`) is retried `_READ_ATTEMPTS` times, then CheckpointReadError;
        interrupts and the rest propagate."""
        path = os.path.join(self.directory, str(step))
        if limited:
            read = functools.partial(call_with_deadline, read, self.wait_seconds, f"{what} of {path}")
        for attempt in range(1, _READ_ATTEMPTS + 1):
            try:
                return read()
            except Exception as error:
                if interrupted() or isinstance(error, StateMismatchError | UnreadableCheckpointError):
                    raise
                reason = unreadable_reason(error)
                if reason is not None:
                    raise UnreadableCheckpointError(f"Checkpoint {path} is unreadable ({what}: {reason})") from error
                if not _transient(error):
                    raise
                if attempt == _READ_ATTEMPTS:
                    raise CheckpointReadError(f"Could not read {what} of checkpoint step {step} at {path} after "
                                              f"{attempt} attempts ({_first_line(error)}); nothing in the workdir was "
                                              "changed: rerun when the file system answers.") from error
                logging.warning("Reading %s of checkpoint step %d failed (%s); retrying.", what, step,
                                _first_line(error))
                time.sleep(_RETRY_SECONDS * attempt)
        raise AssertionError("unreachable")

    def _check_shapes(self, step: int, abstract_state):
        """The step's tree metadata; StateMismatchError if its arrays differ in name or shape from the state's."""
        metadata = self.manager.item_metadata(step)[STATE_ITEM]
        if metadata is None:
            raise FileNotFoundError(f"no tree metadata in {os.path.join(self.directory, str(step), STATE_ITEM)}")
        saved, expected = _shapes(metadata), _shapes(abstract_state)
        if saved != expected:
            raise StateMismatchError(step, os.path.join(self.directory, str(step)), saved, expected)
        return metadata

    def _restore_iterator(self, step: int, iterator: "InputIterator") -> None:
        data_dir = self._data_dir(step)
        if not epath.Path(data_dir).exists():
            raise FileNotFoundError(f"no input iterator state at {data_dir}")
        iterator.restore(data_dir)

    def _set_aside(self, step: int, error: UnreadableCheckpointError) -> None:
        """Renames the unreadable step folder `<step>.unreadable` (`.unreadable.2`, ... if taken), saying why."""
        path = os.path.join(self.directory, str(step))
        moved = f"{path}.unreadable"
        for number in itertools.count(2):
            if not epath.Path(moved).exists():
                break
            moved = f"{path}.unreadable.{number}"
        if jax.process_index() == 0:
            epath.Path(path).rename(moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self.manager.reload()
        older = [s for s in self.steps() if s < step]
        logging.warning("%s; it is renamed %s and %s.", error, moved,
                        f"training resumes from step {older[0]}" if older else "training starts afresh")

    def save(self, step: int, state, config: ml_collections.ConfigDict, iterator: "InputIterator | None",
             force: bool = False) -> bool:
        """Saves `state` with `config` if `step` is on the save interval (or `force`); returns whether it saved."""
        if not (force or self.manager.should_save(step)) or step in self.manager.all_steps():
            return False
        if iterator is not None:
            iterator.save(self._data_dir(step))
        items = {STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(_json_config(config))}
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        self._prune_data_states(keep={step, *self.manager.all_steps()})
        return saved

    def _prune_data_states(self, keep: set[int]) -> None:
        root = os.path.join(self.directory, "data")
        if jax.process_index() != 0 or not epath.Path(root).exists():
            return
        for child in epath.Path(root).iterdir():
            if child.name.isdigit() and int(child.name) not in keep:
                child.rmtree()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def find_step_dir(path: str) -> str | None:
    """The step folder to read for a training workdir (its newest step), its checkpoints folder or one
    step folder; None if `path` is none of these."""
    for directory in (checkpoint_dir(path), path):
        if epath.Path(directory, STATE_ITEM).exists():
            return directory
        if epath.Path(directory).is_dir():
            steps = [int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()]
            steps = [s for s in steps if epath.Path(directory, str(s), STATE_ITEM).exists()]
            if steps:
                return os.path.join(directory, str(max(steps)))
    return None


def workdir_of(step_path: str) -> str:
    """The training workdir of a step folder `<workdir>/checkpoints/<step>`."""
    return os.path.dirname(os.path.dirname(step_path.rstrip("/")))


def _composite_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        **{STATE_ITEM: ocp.PyTreeCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()}))


def read_config(step_path: str) -> ml_collections.ConfigDict | None:
    """The config recorded with a step folder, or None if it has none (written before configs were recorded).
    Raises UnreadableCheckpointError, naming the file, if its bytes are bad."""
    if not epath.Path(step_path, CONFIG_ITEM).exists():
        return None
    try:
        restored = _composite_checkpointer().restore(step_path, args=ocp.args.Composite(
            **{CONFIG_ITEM: ocp.args.JsonRestore()}))
    except Exception as error:
        reason = unreadable_reason(error)
        if reason is None:
            raise
        raise UnreadableCheckpointError(f"Checkpoint {step_path} is unreadable (its recorded config "
                                        f"{os.path.join(step_path, CONFIG_ITEM)}: {reason})") from error
    return ml_collections.ConfigDict(_tuples(restored[CONFIG_ITEM]))


def restore_variables(step_path: str) -> dict:
    """The Flax variables of the TrainState saved in a step folder, as numpy arrays (orbax partial restore):
    {'params': ..., 'batch_stats': ...}, the BatchNorm statistics empty for models without BatchNorm (and for
    steps saved before the TrainState held them)."""
    checkpointer = _composite_checkpointer()
    tree = checkpointer.metadata(step_path).item_metadata[STATE_ITEM].tree
    abstract = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[key])
                for key in ("params", "batch_stats") if tree.get(key)}
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    )
    restored = checkpointer.restore(step_path, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
