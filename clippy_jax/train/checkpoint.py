"""Orbax checkpoints of the train state plus the input iterator's position, with resume.

Orbax writes each step atomically (a step directory appears only once complete), so a run killed
mid-save resumes from the previous complete step, and a step that cannot be read is set aside
for the one before it. The tf.data iterator state of every process is written synchronously to
`<dir>/data/<step>/process_<i>` before the step's (asynchronous) orbax save starts, and pruned
with the steps orbax drops. `<dir>/config.json` records the settings the steps were written with.
"""

import json
import os

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from clippy_jax.data.pipeline import InputIterator

# The resolved config of the run that wrote the checkpoints, compared on resume (`config_checks`).
CONFIG_FILE = "config.json"


class Checkpointer:
    def __init__(self, directory: str, save_every: int, keep: int):
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=True, create=True
            ),
        )

    def _data_dir(self, step: int) -> str:
        return os.path.join(self.directory, "data", str(step), f"process_{jax.process_index()}")

    def steps(self) -> list[int]:
        """The complete steps in the directory, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(self, abstract_state, iterator: InputIterator | None):
        """Restores the newest readable step into `abstract_state`'s shapes and shardings; None if none.

        A step that cannot be read (a missing or corrupt file, or no input iterator state) is
        reported by path and renamed `<step>.unreadable`, and the step before it is tried.
        """
        for step in self.steps():
            path = os.path.join(self.directory, str(step))
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                if iterator is not None:
                    data_dir = self._data_dir(step)
                    if not tf.io.gfile.exists(data_dir):
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
            return state
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            if tf.io.gfile.exists(f"{path}.unreadable"):
                tf.io.gfile.rmtree(f"{path}.unreadable")
            tf.io.gfile.rename(path, f"{path}.unreadable")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self.manager.reload()

    def saved_settings(self) -> dict | None:
        """The flattened config the checkpoints were written with (`CONFIG_FILE`); None if absent."""
        path = os.path.join(self.directory, CONFIG_FILE)
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)

    def write_settings(self, settings: dict) -> None:
        """Records the flattened config of a run that starts afresh, for `saved_settings`."""
        if jax.process_index() == 0:
            tf.io.gfile.makedirs(self.directory)
            with tf.io.gfile.GFile(os.path.join(self.directory, CONFIG_FILE), "w") as f:
                json.dump(settings, f, indent=2, sort_keys=True)

    def save(self, step: int, state, iterator: InputIterator | None, force: bool = False) -> bool:
        """Saves if `step` is on the save interval (or `force`); returns whether it saved."""
        if not (force or self.manager.should_save(step)) or step in self.manager.all_steps():
            return False
        if iterator is not None:
            iterator.save(self._data_dir(step))
        saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self._prune_data_states(keep={step, *self.manager.all_steps()})
        return saved

    def _prune_data_states(self, keep: set[int]) -> None:
        root = os.path.join(self.directory, "data")
        if jax.process_index() != 0 or not tf.io.gfile.exists(root):
            return
        for name in tf.io.gfile.listdir(root):
            name = name.rstrip("/")
            if name.isdigit() and int(name) not in keep:
                tf.io.gfile.rmtree(os.path.join(root, name))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
