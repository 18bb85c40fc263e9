"""`python -m clippy_jax.summary`: parameter counts equal timm's ViT-B/16 and transformers' T5-base
encoders, and GFLOPs come from XLA's cost analysis."""

import os
import subprocess
import sys

import ml_collections
import pytest
import timm
import torch
from transformers import T5Config, T5EncoderModel

from clippy_jax.summary import summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_T5_BASE = {  # t5-base and google/t5-v1_1-base encoder configs
    "t5_1_0": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu"),
    "t5_1_1": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu"),
}


def _config(text_variant: str, image_size: int = 224, keep_ratio: float = 1.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model=dict(image=dict(variant="B/16"), text=dict(size="base", variant=text_variant, vocab_size=32128),
                   image_pool="max", text_pool="mean", pool_temperature=0.1, project_image=True, project_text=True,
                   embed_dim=512, temperature_init=0.07, dtype="bfloat16",
                   param_dtype="float32"),
        data=dict(image_size=image_size, max_text_length=16, keep_ratio=keep_ratio, keep_patches=0),
    ))


def _torch_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@pytest.mark.parametrize("text_variant", ["t5_1_0", "t5_1_1"])
def test_parameter_counts_equal_timm_and_transformers(text_variant, monkeypatch):
    monkeypatch.setattr("clippy_jax.summary._gflops", lambda *args: 0.0)  # counts only
    counts = summarize(_config(text_variant))["parameters"]
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, **HF_T5_BASE[text_variant]))
    assert counts["image_tower"] == _torch_count(vit) - 768  # timm's cls position embedding is folded into cls
    assert counts["text_tower"] == _torch_count(t5)
    assert counts["image_projection"] == counts["text_projection"] == 768 * 512
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_gflops_from_xla_cost_analysis():
    gflops = summarize(_config("t5_1_0", keep_ratio=0.25))["gflops"]
    image = gflops["image encoder, 224x224 (196 tokens)"]
    assert 33 < image < 37  # ViT-B/16 at 224: 17.6 G multiply-adds
    assert gflops["image encoder, 49 kept tokens (training)"] < image / 3
    assert 0 < gflops["text encoder, 16 tokens"] < 5


def test_command_line_on_the_demo_config():
    result = subprocess.run(
        [sys.executable, "-m", "clippy_jax.summary", "--config=configs/demo.py:size=tiny"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("image_tower", "text_tower", "total", "image encoder, 64x64 (64 tokens)", "text encoder, 24 tokens"):
        assert name in result.stdout
