"""The authors' open_clip-format CLIPpy checkpoint -> a complete `TwoTower` parameter tree.

Layout (kahnchana/clippy, `clippy-B-16`): `visual.trunk.*` is timm's DINO ViT-B/16 with its final
`norm`, pooled by a global max over all tokens, CLS included (open_clip's TimmModel with
`timm_pool='global_max'`: no image projection); the text tower is sentence-T5-base with masked mean
pooling, stored either as sentence-transformers modules (`text.0.auto_model.*` and the bias-free
Dense `text.2.linear.weight`) or as open_clip's HFTextEncoder (`text.transformer.*`, a bare T5Stack,
with an optional `text.proj.weight`); `logit_scale` is log(1 / tau). A linear image head
(`visual.head.proj.weight`) is imported when present.
"""

import re

import numpy as np

from clippy_jax.convert.common import Converted, KeyReport, map_state, read_state_dict, select, transpose
from clippy_jax.convert.t5 import convert_hf_t5, kwargs_from_hf_state
from clippy_jax.convert.vit import convert_vit

VISUAL_PREFIX = "visual.trunk."
TEXT_PREFIXES = ("text.transformer.", "text.0.auto_model.", "text.auto_model.")
HEAD_RULES = [
    (r"visual\.head\.proj\.weight", "image_projection/kernel", transpose),
    (r"text\.proj\.weight|text\.2\.linear\.weight", "text_projection/kernel", transpose),
    ("logit_scale", "logit_scale", lambda x: np.reshape(x, ())),
]


def _split(state: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> tuple[dict[str, np.ndarray], str | None]:
    """The keys under the first of `prefixes` present (prefix stripped), and that prefix."""
    for prefix in prefixes:
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return part, prefix
    raise KeyError(f"Not an open_clip CLIPpy checkpoint: no keys under {prefixes} (keys start {sorted(state)[:5]}).")


def _prefixed(report: KeyReport, prefix: str) -> KeyReport:
    return KeyReport(report.missing, [prefix + k for k in report.unexpected],
                     [(prefix + k, got, want) for k, got, want in report.misshaped])


def import_open_clip_clippy(path: str, image_pool: str = "max_with_cls") -> Converted:
    """The CLIPpy checkpoint (e.g. `clippy_5k.pt`, or an open_clip training checkpoint of it)."""
    state = select(read_state_dict(path), containers=("state_dict", "model"), prefixes=("module.",))
    visual, _ = _split(state, (VISUAL_PREFIX,))
    text, text_prefix = _split(state, TEXT_PREFIXES)
    image = convert_vit(visual)
    text_kwargs = kwargs_from_hf_state(text)
    text_tower = convert_hf_t5(text, text_kwargs)

    rest = {k: v for k, v in state.items() if not k.startswith((VISUAL_PREFIX, text_prefix))}
    in_widths = {"image_projection/kernel": image.model_config["image"]["width"],
                 "text_projection/kernel": text_kwargs["embed_dim"]}
    out_widths = {target: int(v.shape[0]) for pattern, target, _ in HEAD_RULES[:2]
                  for k, v in rest.items() if re.fullmatch(pattern, k)}  # projections present
    image_dim, text_dim = (out_widths.get(t, w) for t, w in in_widths.items())
    if image_dim != text_dim:
        raise ValueError(f"The image ({image_dim}) and text ({text_dim}) embeddings of {path} differ in width.")
    expected = {t: (in_widths[t], image_dim) for t in out_widths}
    expected["logit_scale"] = ()
    head_params, head_report = map_state(rest, HEAD_RULES, expected)

    logit_scale = float(head_params.get("logit_scale", np.log(1 / 0.07)))
    model_config = dict(
        image=image.model_config["image"], text=text_kwargs, image_pool=image_pool, text_pool="mean",
        embed_dim=image_dim, temperature_init=float(np.exp(-logit_scale)), pool_temperature=0.1,
        project_image="image_projection/kernel" in out_widths, project_text="text_projection/kernel" in out_widths,
        dtype="float32", param_dtype="float32",
    )
    report = _prefixed(image.report, VISUAL_PREFIX).merged(_prefixed(text_tower.report, text_prefix))
    report = report.merged(head_report)
    return Converted({**image.params, **text_tower.params, **head_params}, model_config, report)

