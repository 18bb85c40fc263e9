"""The machinery every evaluator shares: per-host example subsets, batched inference sharded over
the mesh, and dense score maps brought back to label resolution.

Each host reads its own subset of the split (examples i, i + P, i + 2P, ... on host i of P). Images
become fixed-shape windows (`geometry.Geometry`); windows are batched `eval.batch_size` at a time
over the mesh's batch axes (`clippy_jax.sharding`), and the outputs come back to the host
that fed them. Hosts run the same number of device steps (short hosts feed padding), so the
collectives of sharded parameters line up. Metrics are then merged over hosts
(`metrics.merge_across_hosts`).
"""

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from clippy_jax import platforms, sharding
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import geometry, zero_shot

if TYPE_CHECKING:  # the dataset builders (TensorFlow) load with the first dataset, not with inference
    import tensorflow_datasets as tfds

# The event JAX records for each XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compilations() -> Iterator[list[int]]:
    """Counts XLA compilations in its block: `with counting_compilations() as count: ...; count[0]`."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        count[0] += event == COMPILE_EVENT

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@dataclasses.dataclass
class EvalContext:
    """What evaluators need besides their own task settings. It lives as long as its model: the
    compiled functions of its runners serve every evaluation, and `use_params` swaps the parameters
    evaluated (e.g. at each periodic evaluation of a training run).

    Attributes:
      config: the whole config; evaluators read `config.eval` (batch_size, manual_dir, tfds_dir,
        max_examples, num_overlays, progress).
      data_config: the prepared `data` section (image mean / std; the demo's eval split).
      params: the parameters evaluated now.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    tokenizer: Tokenizer
    data_config: ml_collections.ConfigDict
    mesh: Mesh
    params: object = None
    _label_embeddings: dict = dataclasses.field(default_factory=dict)
    _runners: dict = dataclasses.field(default_factory=dict)

    def use_params(self, params) -> None:
        """Evaluates `params` from now on (the label embeddings of the previous ones are dropped)."""
        self.params = params
        self._label_embeddings.clear()

    def label_embeddings(self, prompts: Sequence[Sequence[str]], templates: Sequence[str] = ("{}",)) -> jax.Array:
        """`zero_shot.label_embeddings`, computed once per prompt set (e.g. for ImageNet and ImageNet-V2)."""
        key = (tuple(map(tuple, prompts)), tuple(templates))
        if key not in self._label_embeddings:
            self._label_embeddings[key] = zero_shot.label_embeddings(
                self.model, self.params, self.tokenizer, prompts, templates
            )
        return self._label_embeddings[key]

    @property
    def local_batch_size(self) -> int:
        batch_size = self.config.eval.batch_size
        parallel = int(np.prod([self.mesh.shape[axis] for axis in sharding.BATCH_AXES]))
        if batch_size % parallel or batch_size % jax.process_count():
            raise ValueError(
                f"config.eval.batch_size={batch_size} must be divisible by the {parallel} data-parallel devices "
                f"and the {jax.process_count()} hosts."
            )
        return batch_size // jax.process_count()

    def model_inputs(self, crops: Sequence[np.ndarray], window_shape: Sequence[int]) -> np.ndarray:
        """Normalised float32 [n, h, w, 3] from crops in [0, 255] (n may be 0)."""
        if not len(crops):
            return np.zeros((0, *window_shape, 3), np.float32)
        return geometry.normalize(np.stack(crops), self.data_config.mean, self.data_config.std)

    def runner(self, fn: Callable, **static) -> "BatchRunner":
        """The BatchRunner of `fn(model, params, images, *args, **static)`, one per (fn, static) so that
        its compilations are reused by every evaluator of this context."""
        key = (fn, tuple(sorted(static.items())))
        if key not in self._runners:
            self._runners[key] = BatchRunner(self, functools.partial(fn, self.model, **static))
        return self._runners[key]

    def progress(self, total: int, desc: str) -> tqdm.tqdm:
        enabled = self.config.eval.progress and jax.process_index() == 0
        return tqdm.tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


@dataclasses.dataclass
class Examples:
    """This host's share of an evaluation split: `num_global` examples over all hosts."""

    iterator: Iterator[dict]
    num_global: int
    info: "tfds.core.DatasetInfo | None" = None

    @property
    def num_local(self) -> int:
        return len(range(jax.process_index(), self.num_global, jax.process_count()))

    def chunks(self, size: int, progress: tqdm.tqdm) -> Iterator[list[dict]]:
        """Lists of up to `size` examples; the same number of lists on every host (some may be empty)."""
        per_host = math.ceil(self.num_global / jax.process_count())
        with progress:
            for _ in range(math.ceil(per_host / size)):
                chunk = [example for _, example in zip(range(size), self.iterator)]
                progress.update(len(chunk))
                yield chunk


def dataset_examples(ctx: EvalContext, task: ml_collections.ConfigDict) -> Examples:
    """The examples of `task.dataset` (a builder of `clippy_jax.data.eval_datasets`) for this host."""
    from clippy_jax.data import eval_datasets  # noqa: PLC0415 (TensorFlow, only where datasets are read)

    manual_dir = task.get("manual_dir") or ctx.config.eval.manual_dir
    builder = eval_datasets.builder(task.dataset, manual_dir, ctx.config.eval.tfds_dir)
    ds = builder.as_dataset(split=task.get("split") or builder.EVAL_SPLIT, shuffle_files=False)
    max_examples = task.get("max_examples") or ctx.config.eval.max_examples
    if max_examples:
        ds = ds.take(max_examples)
    num_global = int(ds.cardinality())
    ds = ds.shard(jax.process_count(), jax.process_index())
    return Examples(ds.as_numpy_iterator(), num_global, builder.info)


def array_examples(arrays: dict[str, np.ndarray]) -> Examples:
    """In-memory examples (the demo's eval split), split over hosts like a dataset."""
    num_global = len(next(iter(arrays.values())))
    local = range(jax.process_index(), num_global, jax.process_count())
    return Examples(iter([{k: v[i] for k, v in arrays.items()} for i in local]), num_global)


def sync_max(value: int) -> int:
    """The maximum of `value` over hosts."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def batch_function(fn: Callable, mesh: Mesh) -> Callable:
    """`fn(params, images, *args)` jitted for `mesh` (its platform's code paths and compiler options), the model's
    logical constraints bound to it and the outputs sharded over its batch axes."""

    def apply(params, images, *args):
        with sharding.bind_mesh(mesh):
            return fn(params, images, *args)

    return platforms.jit(apply, mesh, out_shardings=sharding.batch_sharding(mesh))


class BatchRunner:
    """Runs `fn(params, images [B, h, w, 3], *args)` -> pytree of [B, ...] arrays on global batches
    sharded over the mesh's batch axes; returns this host's rows as numpy."""

    def __init__(self, ctx: EvalContext, fn: Callable):
        self.ctx = ctx
        self.fn = batch_function(fn, ctx.mesh)

    def __call__(self, images: np.ndarray, *args) -> dict:
        """images: normalised float32 [n, h, w, 3] (n may be 0); args: replicated inputs."""
        size = self.ctx.local_batch_size
        outputs = []
        with jax.set_mesh(self.ctx.mesh):
            for step in range(sync_max(math.ceil(len(images) / size))):
                chunk = images[step * size:(step + 1) * size]
                padded = np.zeros((size, *images.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                batch = sharding.global_batch({"image": padded}, self.ctx.mesh)["image"]
                out = self.fn(self.ctx.params, batch, *args)
                local = multihost_utils.global_array_to_host_local_array(
                    out, self.ctx.mesh, PartitionSpec(sharding.BATCH_AXES)
                )
                valid = len(chunk)
                outputs.append(jax.tree.map(lambda x, n=valid: np.asarray(x)[:n], local))
        if not outputs:
            return None
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def dense_predictions(
    ctx: EvalContext, examples: Examples, geo: geometry.Geometry, runner: BatchRunner, *args, desc: str = "",
) -> Iterator[tuple[dict, np.ndarray, dict]]:
    """Yields (example, argmax of the scores at label resolution [H, W], this example's other outputs)
    for every local example, in order.

    `runner(images, *args)` returns a dict with `scores` [B, gh, gw, K] per window (and other per-window
    outputs, e.g. image-level `logits`, returned for the first window of each example). Label
    resolution is the shape of `example["label"]`.
    """
    for chunk in examples.chunks(ctx.local_batch_size, ctx.progress(examples.num_local, desc)):
        crops, layout = [], []
        for example in chunk:
            windows, boxes, resized = geo.windows(example["image"])
            layout.append((len(crops), boxes, resized))
            crops.extend(windows)
        outputs = runner(ctx.model_inputs(crops, geo.window_shape), *args)
        for example, (start, boxes, resized) in zip(chunk, layout):
            scores = geometry.to_label_resolution(
                outputs["scores"][start:start + len(boxes)], boxes, resized, geo.window_shape, example["label"].shape
            )
            others = {k: v[start] for k, v in outputs.items() if k != "scores"}
            yield example, np.asarray(scores.argmax(-1)), others


@dataclasses.dataclass
class EvalResult:
    """One evaluator's results.

    Attributes:
      summary: JSON-serialisable results (the evaluator's entry of `results.json`).
      scalars: logged as `<evaluator>/<key>`.
      headline: markdown lines for `results.md`, above the tables.
      tables: markdown tables by title: logged as text and written to `results.md`.
      overlays: uint8 figures [h, w, 3], logged as images.
    """

    summary: dict
    scalars: dict[str, float]
    headline: list[str] = dataclasses.field(default_factory=list)
    tables: dict[str, str] = dataclasses.field(default_factory=dict)
    overlays: list[np.ndarray] = dataclasses.field(default_factory=list)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; floats with 4 decimals."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
