"""The layout of a training workdir's checkpoints: written by training, read by evaluation and inference.

    <workdir>/checkpoints/<step>/default/     the TrainState (orbax StandardSave)
    <workdir>/checkpoints/<step>/config/      the resolved config that trained it (orbax JsonSave)
    <workdir>/checkpoints/data/<step>/process_<i>/iterator.npz   each process's input position
    <workdir>/tokenizer.model                 a copy of the tokenizer it trained with

Orbax writes each step atomically (a step directory appears only once complete, with its config), so a
run killed mid-save resumes from the previous complete step, and a step that cannot be read is set
aside for the one before it. The input iterator state of every process is written synchronously before
the step's (asynchronous) orbax save starts, and pruned with the steps orbax drops. Steps written before
the config was recorded have no `config/` item: they load with a config file (`model_config`).
"""

import json
import os
from typing import TYPE_CHECKING

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

if TYPE_CHECKING:  # reading checkpoints (evaluation, inference) needs neither tf.data nor TensorFlow
    from clippy_jax.data.pipeline import InputIterator

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "default"  # the name CheckpointManager gives a single item, kept for older checkpoints
CONFIG_ITEM = "config"
TOKENIZER_FILE = "tokenizer.model"


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

    def __init__(self, workdir: str, save_every: int, keep: int):
        self.directory = checkpoint_dir(workdir)
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

    def saved_config(self, step: int) -> ml_collections.ConfigDict | None:
        """The config recorded with `step`; None for a step written before configs were recorded."""
        return read_config(os.path.join(self.directory, str(step)))

    def restore(self, abstract_state, iterator: "InputIterator | None"):
        """Restores the newest readable step into `abstract_state`'s shapes and shardings; None if none.

        A step that cannot be read (a missing or corrupt file, or no input iterator state) is
        reported by path and renamed `<step>.unreadable`, and the step before it is tried.
        """
        for step in self.steps():
            path = os.path.join(self.directory, str(step))
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
                if iterator is not None:
                    data_dir = self._data_dir(step)
                    if not epath.Path(data_dir).exists():
                        raise FileNotFoundError(f"no input iterator state at {data_dir}")
                    iterator.restore(data_dir)
            except Exception as error:  # noqa: BLE001 (any unreadable step falls back to the one before)
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                older = [s for s in self.steps() if s < step]
                logging.warning("Checkpoint step %d at %s is unreadable (%s); it is renamed %s.unreadable and %s.",
                                step, path, reason[:500], path,
                                f"training resumes from step {older[0]}" if older else "training starts afresh")
                self._set_aside(step)
                continue
            logging.info("Resumed from checkpoint step %d in %s.", step, self.directory)
            return restored[STATE_ITEM]
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            if epath.Path(f"{path}.unreadable").exists():
                epath.Path(f"{path}.unreadable").rmtree()
            epath.Path(path).rename(f"{path}.unreadable")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self.manager.reload()

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
    """The config recorded with a step folder, or None if it has none (written before configs were recorded)."""
    if not epath.Path(step_path, CONFIG_ITEM).exists():
        return None
    restored = _composite_checkpointer().restore(step_path, args=ocp.args.Composite(
        **{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return ml_collections.ConfigDict(_tuples(restored[CONFIG_ITEM]))


def restore_params(step_path: str) -> dict:
    """The `params` subtree of the TrainState saved in a step folder, as numpy arrays (orbax partial restore)."""
    checkpointer = _composite_checkpointer()
    tree = checkpointer.metadata(step_path).item_metadata[STATE_ITEM].tree
    abstract = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])}
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    )
    return checkpointer.restore(step_path, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]["params"]
