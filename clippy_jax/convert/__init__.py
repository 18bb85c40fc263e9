"""Checkpoint importers (timm / DINO ViT, timm EfficientNet, HF and t5x T5, the authors' open_clip CLIPpy) into our
parameter tree, and the loader / merger that training, evaluation and inference use.

    python -m clippy_jax.convert --from=KIND --input=PATH --output=DIR [--allow-partial]

`load_pretrained(DIR)` returns (params subtree, model config entries); `merge_pretrained(params,
subtree)` puts the subtree into an initialised parameter tree, refusing partial loads by default.
See README.md in this folder for where to get each checkpoint.
"""

from collections.abc import Callable

from clippy_jax.convert.clippy import import_open_clip_clippy
from clippy_jax.convert.common import (
    CheckpointMismatchError,
    Converted,
    KeyReport,
    load_pretrained,
    load_pretrained_batch_stats,
    merge_pretrained,
    save_pretrained,
)
from clippy_jax.convert.efficientnet import import_timm_efficientnet
from clippy_jax.convert.t5 import import_hf_t5, import_t5x
from clippy_jax.convert.vit import import_dino, import_timm_vit

IMPORTERS: dict[str, Callable[..., Converted]] = {
    "timm_vit": import_timm_vit,
    "dino": import_dino,
    "timm_efficientnet": import_timm_efficientnet,
    "hf_t5": import_hf_t5,
    "t5x": import_t5x,
    "open_clip_clippy": import_open_clip_clippy,
}

__all__ = [
    "IMPORTERS",
    "CheckpointMismatchError",
    "Converted",
    "KeyReport",
    "load_pretrained",
    "load_pretrained_batch_stats",
    "merge_pretrained",
    "save_pretrained",
]
