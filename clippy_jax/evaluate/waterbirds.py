"""Waterbirds robustness (paper appendix H, Tab. 7) with CLIPpy's spatial zero-shot prediction.

Each category (background, waterbird, landbird) is embedded as the normalised mean of the
embeddings of its prompts (`prompts/waterbirds.txt`, the appendix's lists). At every location of the
image's patch grid the category with the highest cosine similarity wins. Among the locations not
won by background, a location won by waterbird scores its similarity to the waterbird embedding,
likewise for landbird; the prediction is the bird whose best location scores highest, i.e. the
bird category of the non-background location closest to its category embedding. When background
wins everywhere, the bird with the highest similarity at any location is predicted.

Accuracy is reported per (background, bird) cell, as in Tab. 7, with per bird
delta = accuracy on its usual background - accuracy on the other (landbirds: land - water;
waterbirds: water - land), their mean, the mean over the four cells and the worst cell.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clippy_jax.data.eval_datasets.waterbirds import WATERBIRDS_CLASS_NAMES, WATERBIRDS_PLACE_NAMES
from clippy_jax.evaluate import engine, zero_shot
from clippy_jax.evaluate.geometry import Geometry, upsample
from clippy_jax.evaluate.metrics import GroupAccuracy, merge_across_hosts
from clippy_jax.evaluate.render import segmentation_overlay

CATEGORIES = ("background", "waterbird", "landbird")
# Dataset label (0 landbird, 1 waterbird) of each bird category's column in the similarities.
_BIRD_COLUMNS = {0: CATEGORIES.index("landbird"), 1: CATEGORIES.index("waterbird")}


def spatial_prediction(similarity: jax.Array) -> jax.Array:
    """similarity [B, N, 3] to (background, waterbird, landbird) -> predicted dataset label [B]
    (0 landbird, 1 waterbird)."""
    winner = similarity.argmax(axis=-1)  # [B, N]
    birds = jnp.stack([similarity[..., _BIRD_COLUMNS[label]] for label in (0, 1)], axis=-1)  # [B, N, 2]
    won = jnp.stack([winner == _BIRD_COLUMNS[label] for label in (0, 1)], axis=-1)
    best = jnp.where(won, birds, -jnp.inf).max(axis=1)  # [B, 2]
    fallback = birds.max(axis=1)
    return jnp.where(won.any(axis=(1, 2))[:, None], best, fallback).argmax(axis=-1)


def predict(model: nn.Module, params, images: jax.Array, category_emb: jax.Array) -> dict[str, jax.Array]:
    """The predicted dataset label [B] and the similarities [B, h, w, 3] to the category embeddings."""
    _, dense = zero_shot.encode_image(model, params, images)
    similarity = zero_shot.location_logits(dense, category_emb)  # [B, h, w, 3]
    flat = similarity.reshape(similarity.shape[0], -1, similarity.shape[-1])
    return {"prediction": spatial_prediction(flat), "similarity": similarity}


def waterbirds(ctx: engine.EvalContext, task: ml_collections.ConfigDict) -> engine.EvalResult:
    """The 2 x 2 accuracy table of appendix H on `task.dataset` (the `waterbirds` builder's test split)."""
    examples = engine.dataset_examples(ctx, task)
    prompts = zero_shot.read_label_prompts(task.prompts, CATEGORIES)
    category_emb = ctx.label_embeddings(prompts)  # [3, E]
    geometry = Geometry.from_config(task)
    if geometry.window:
        raise ValueError("The Waterbirds evaluation decides per image on one patch grid: use resize mode (window=0).")

    runner = ctx.runner(predict)
    cells = GroupAccuracy(correct=np.zeros(4, np.int64), total=np.zeros(4, np.int64))
    overlays = []
    num_overlays = task.get("num_overlays", ctx.config.eval.num_overlays)
    for chunk in examples.chunks(ctx.local_batch_size, ctx.progress(examples.num_local, "waterbirds")):
        crops = [geometry.windows(e["image"])[0][0] for e in chunk]
        outputs = runner(ctx.model_inputs(crops, geometry.window_shape), category_emb)
        if not chunk:
            continue
        labels = np.asarray([e["label"] for e in chunk])
        places = np.asarray([e["place"] for e in chunk])
        cells = cells.merge(GroupAccuracy.from_model_output(
            correct=outputs["prediction"] == labels, groups=places * 2 + labels, num_groups=4
        ))
        for example, similarity in zip(chunk, outputs["similarity"]):
            if len(overlays) < num_overlays:
                winner = np.asarray(upsample(similarity, example["image"].shape[:2]).argmax(-1))
                overlays.append(segmentation_overlay(example["image"], None, winner, CATEGORIES))
    accuracy = merge_across_hosts(cells).compute().reshape(2, 2)  # [place, bird label]
    table = {
        place: {bird: float(accuracy[p, b]) for b, bird in enumerate(WATERBIRDS_CLASS_NAMES)}
        for p, place in enumerate(WATERBIRDS_PLACE_NAMES)
    }
    delta = {"landbird": float(accuracy[0, 0] - accuracy[1, 0]), "waterbird": float(accuracy[1, 1] - accuracy[0, 1])}
    summary = dict(
        accuracy=table, delta=delta, mean_delta=float(np.mean(list(delta.values()))),
        mean_accuracy=float(np.nanmean(accuracy)), worst_group_accuracy=float(np.nanmin(accuracy)),
        num_images=examples.num_global,
    )
    rows = [[f"{place} background", *(table[place][bird] for bird in WATERBIRDS_CLASS_NAMES)]
            for place in WATERBIRDS_PLACE_NAMES]
    rows.append(["delta (usual - other background)", delta["landbird"], delta["waterbird"]])
    scalars = {f"accuracy/{place}_{bird}": v for place, row in table.items() for bird, v in row.items()}
    scalars.update({f"delta/{k}": v for k, v in delta.items()}, mean_delta=summary["mean_delta"],
                   mean_accuracy=summary["mean_accuracy"], worst_group_accuracy=summary["worst_group_accuracy"])
    return engine.EvalResult(
        summary=summary,
        scalars={k: v for k, v in scalars.items() if not np.isnan(v)},
        headline=[f"- mean accuracy over the 4 groups: {summary['mean_accuracy']:.4f}",
                  f"- worst-group accuracy: {summary['worst_group_accuracy']:.4f}",
                  f"- mean delta: {summary['mean_delta']:.4f}"],
        tables={"accuracy": engine.markdown_table(["", *WATERBIRDS_CLASS_NAMES], rows)},
        overlays=overlays,
    )
