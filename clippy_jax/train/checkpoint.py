"""Orbax checkpoints of the train state plus the input iterator's position, with resume.

Orbax writes each step atomically (a step directory appears only once complete), so a run killed
mid-save resumes from the previous complete step. The tf.data iterator state of every process is
written synchronously to `<dir>/data/<step>/process_<i>` before the step's (asynchronous) orbax
save starts, and pruned with the steps orbax drops.
"""

import os

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

from clippy_jax.data.pipeline import InputIterator


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

    def restore(self, abstract_state, iterator: InputIterator | None):
        """Restores the latest step into `abstract_state`'s shapes and shardings; None if none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        if iterator is not None:
            data_dir = self._data_dir(step)
            if not tf.io.gfile.exists(data_dir):
                raise FileNotFoundError(
                    f"Checkpoint step {step} has no input iterator state at {data_dir}; it was written by "
                    "another run layout. Restore its parameters with config.init_from instead."
                )
            iterator.restore(data_dir)
        logging.info("Resumed from checkpoint step %d in %s.", step, self.directory)
        return state

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
