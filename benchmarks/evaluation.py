"""Evaluation throughput of a ViT-B/16 CLIPpy: images/s of top-down zero-shot segmentation (VOC's
21 labels and prompts) and of PCA grouping, at 224 and 448, through the evaluators' own code path
(`segmentation.top_down` / `grouping.group_scores` via `engine.dense_predictions`: resize, batches
over the mesh, per-location logits, bilinear upsampling to label resolution, argmax, confusion matrix).

  .venv/bin/python benchmarks/evaluation.py [--images=16] [--batch_size=8]

"model only" times the device part alone (resized windows in, per-location logits at the patch grid
out). Images are 375 x 500 (VOC's most common size) random pixels with random labels; a randomly
initialised model (the text tower is tiny: text encoding happens once per evaluation and is not
timed). Reports wall-clock images/s and images per CPU-second of this process (the per-machine rate
without the time lost to other processes on a shared machine), after one warm-up pass.
"""

import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in clippy_jax/evaluate/__main__.py

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from clippy_jax import sharding  # noqa: E402
from clippy_jax.data.eval_datasets.voc import VOC_CLASS_NAMES  # noqa: E402
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from clippy_jax.evaluate import engine, grouping, segmentation, zero_shot  # noqa: E402
from clippy_jax.evaluate.geometry import Geometry  # noqa: E402
from clippy_jax.models.two_tower import TwoTower  # noqa: E402
from clippy_jax.models.vit import vit_config  # noqa: E402

_IMAGES = flags.DEFINE_integer("images", 16, "Timed images per setting.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Evaluation batch size (windows per device step).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/clippy_eval_benchmark", "Where the tokenizer is written.")

SETTINGS = [
    ("model only (ViT-B/16 + per-location logits), 224 x 224", "model", Geometry(input_size=(224, 224))),
    ("model only (ViT-B/16 + per-location logits), 448 x 448", "model", Geometry(input_size=(448, 448))),
    ("segmentation, 224 x 224 (196 tokens)", "segmentation", Geometry(input_size=(224, 224))),
    ("segmentation, 448 x 448 (784 tokens)", "segmentation", Geometry(input_size=(448, 448))),
    ("segmentation, 448 sliding windows (stride 298; 2 per image)", "segmentation",
     Geometry(window=448, stride=298, short_side=448)),
    ("grouping (PCA, 2 groups), 224 x 224", "grouping", Geometry(input_size=(224, 224))),
    ("grouping (PCA, 2 groups), 448 x 448", "grouping", Geometry(input_size=(448, 448))),
]


def _context(prompts: list[list[str]]) -> engine.EvalContext:
    path = train_sentencepiece([p for group in prompts for p in group] * 4, os.path.join(_WORKDIR.value, "sp.model"),
                               vocab_size=128)
    tokenizer = Tokenizer(path, 16)
    text = dict(vocab_size=tokenizer.vocab_size, embed_dim=64, depth=1, num_heads=2, head_dim=32, mlp_dim=128)
    model = TwoTower(image=dict(vit_config("B/16"), posemb_grid=(14, 14)), text=text, image_pool="max",
                     text_pool="mean", embed_dim=512, temperature_init=0.07, pool_temperature=0.1,
                     project_image=True, project_text=True, dtype=jnp.float32, param_dtype=jnp.float32)
    batch = dict(image=jnp.zeros((1, 224, 224, 3)), tokens=jnp.ones((1, 16), jnp.int32))
    params = jax.jit(lambda rng: model.init(rng, batch)["params"])(jax.random.key(0))
    config = ml_collections.ConfigDict(dict(
        mesh=dict(data=-1, fsdp=1, model=1),
        eval=dict(batch_size=_BATCH_SIZE.value, num_overlays=0, progress=False, max_examples=0),
    ))
    data = ml_collections.ConfigDict(dict(mean=(0.5,) * 3, std=(0.25,) * 3))
    context = engine.EvalContext(config, model, tokenizer, data, sharding.make_mesh(config.mesh))
    context.use_params(params)
    return context


def _examples(count: int, seed: int) -> engine.Examples:
    rng = np.random.default_rng(seed)
    return engine.array_examples(dict(
        image=rng.integers(0, 256, (count, 375, 500, 3), np.uint8),
        label=rng.integers(0, len(VOC_CLASS_NAMES), (count, 375, 500), np.uint8),
    ))


def _run(ctx: engine.EvalContext, kind: str, geometry: Geometry, prompts, count: int, seed: int) -> None:
    if kind == "model":  # the device part alone: already resized windows in, logits at the patch grid out
        windows = np.random.default_rng(seed).normal(size=(count, *geometry.window_shape, 3)).astype(np.float32)
        ctx.runner(segmentation.predict)(windows, ctx.label_embeddings(prompts))
        return
    examples = _examples(count, seed)
    if kind == "segmentation":
        segmentation.top_down(ctx, examples, VOC_CLASS_NAMES, prompts, geometry, 0, kind)
        return

    for _ in engine.dense_predictions(ctx, examples, geometry, ctx.runner(grouping.predict_groups, num_groups=2)):
        pass


def main(argv: list[str]) -> None:
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    prompts = zero_shot.read_label_prompts("voc2012_seg.txt", VOC_CLASS_NAMES)
    ctx = _context(prompts)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), batch {_BATCH_SIZE.value}, "
          f"{_IMAGES.value} images of 375 x 500 per setting")
    print("| setting | images/s (wall) | images per CPU-second |\n|---|---|---|")
    for name, kind, geometry in SETTINGS:
        _run(ctx, kind, geometry, prompts, _BATCH_SIZE.value, seed=0)  # warm-up: compilation
        wall, cpu = time.perf_counter(), time.process_time()
        _run(ctx, kind, geometry, prompts, _IMAGES.value, seed=1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"| {name} | {_IMAGES.value / wall:.2f} | {_IMAGES.value / cpu:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
