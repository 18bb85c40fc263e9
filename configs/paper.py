"""The paper's training recipe (CLIPpy, ICCV 2023, appendix E), shared by `hqitp.py` and `cc12m.py`.

Dataset paths are required: pass them as overrides, e.g.
  --config.data.train_pattern='gs://bucket/cc12m/*.tfrecord' --config.data.tokenizer_path=.../t5.model
  --config.init.image=DIR_OF_CONVERTED_DINO --config.init.text=DIR_OF_CONVERTED_T5
(`--config.init.image=random` / `--config.init.text=random` for the random-init ablations of Tab. 9).
"""

import math
import os

import ml_collections
from ml_collections.config_dict import placeholder

# Launch plans at the paper's batch of 4096 (not in the paper: it trained on 32 GPUs), chosen by compiling the step
# with each pod's own compiler (BENCHMARKS.md, "Pod plans"; `python -m clippy_jax.plan --target=...`): the mesh and
# remat of both towers. Selected by `configs/cc12m.py:pod=NAME` (names as Cloud TPU's accelerator types, or
# GPU x count); the launch scripts' examples use them.
PODS = {
    "h100x32": dict(mesh=dict(data=4, fsdp=8, model=1), remat="none"),  # 29 ms roofline vs 44 ms data-parallel
    "a100x32": dict(mesh=dict(data=-1, fsdp=1, model=1), remat="none"),
    "h200x8": dict(mesh=dict(data=-1, fsdp=1, model=1), remat="none"),
    "v4-64": dict(mesh=dict(data=-1, fsdp=1, model=1), remat="none"),
    "v5litepod-256": dict(mesh=dict(data=-1, fsdp=1, model=1), remat="none"),
    "v5p-128": dict(mesh=dict(data=-1, fsdp=1, model=1), remat="none"),
    "v5litepod-16": dict(mesh=dict(data=-1, fsdp=1, model=1), remat="dots"),  # 14.8 GB of XLA:TPU's 16.9 (15.6 without)
    "v5litepod-8": dict(mesh=dict(data=1, fsdp=8, model=1), remat="full"),  # the smallest v5e slice: 16.7 of 16.9 GB
}


def parse_arg(arg: str) -> dict[str, str]:
    """`pod=NAME` of a config string ("" for none)."""
    options = dict(pod="")
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key not in options:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(options)} (e.g. pod=v4-64).")
        options[key] = value
    if options["pod"] and options["pod"] not in PODS:
        raise ValueError(f"Unknown pod={options['pod']!r}; choose from {sorted(PODS)}.")
    return options


def paper_config(num_examples: int, epochs: int, batch_size: int = 4096, pod: str = "") -> ml_collections.ConfigDict:
    """The recipe for a dataset of `num_examples` pairs trained for `epochs` epochs; `pod`: a launch plan of PODS."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    steps = math.ceil(num_examples * epochs / batch_size)

    config.data = dict(
        source="img2dataset_tfrecord",
        train_pattern=placeholder(str),  # required
        eval_pattern="",
        tokenizer_path=placeholder(str),  # required: T5's SentencePiece model (spiece.model)
        image_key="jpg,jpeg,png,webp",
        text_key="txt",
        tfds_name="",  # source=tfds: a TFDS dataset name instead of the shards
        tfds_data_dir="",
        tfds_split="train",
        crop="random",  # random | center crop of the longer side
        image_size=448,  # up to 2x the 224 resolution during training (appendix D.4)
        keep_ratio=0.2,  # randomly drop 80% of the visual tokens (appendix D.4)
        keep_patches=0,
        mean=(0.485, 0.456, 0.406),  # replace with `python -m clippy_jax.data.stats` (appendix C)
        std=(0.229, 0.224, 0.225),
        max_text_length=64,  # captions average 20.1 tokens (appendix C)
        shuffle_buffer=20_000,
        interleave=16,
        prefetch=4,
        max_input_wait_seconds=900.0,  # stop when no batch arrives, or a start-up read does not answer, for this long
        max_consecutive_skips=10_000,  # ... or when this many records in a row are unusable
    )
    config.model = dict(
        # patch_stride < 16: overlapping patches (appendix E, "Patch Sub-Sampling"; the stride is not
        # stated), e.g. --config.model.image.patch_stride=8 --config.data.keep_patches=196 keeps the
        # sequence length of the 224 grid.
        # remat (not in the paper): "dots" keeps the blocks' weight-matmul outputs and recomputes attention,
        # norms and activations in the backward pass, "full" keeps only the block inputs: less activation
        # memory for ~15% more time per step at this geometry (BENCHMARKS.md, issue 11).
        image=dict(variant="B/16", patch_stride=16, posemb_grid=(14, 14), use_cls_token=True,
                   remat="none"),  # ViT-B/16 (appendix D.1)
        # T5-base encoder (appendix D.1: 12 layers, 12 heads, 768 channels) with T5's 32k vocabulary
        text=dict(size="base", variant="t5_1_0", vocab_size=32128, remat="none"),
        image_pool="max",  # CLIPpy's spatial max (Sec. 3)
        text_pool="mean",  # average pooling of tokens (appendix Tab. 8)
        pool_temperature=0.1,  # softmax temperature of the 'wmp' and 'tsp' ablation heads (appendix Tab. 10)
        project_image=True,
        project_text=True,
        embed_dim=512,
        temperature_init=0.07,
        dtype="bfloat16",
        param_dtype="float32",
    )
    config.init = dict(
        image=placeholder(str),  # converted DINO ViT-B/16 (appendix Tab. 4, 9), or "random"
        # converted T5-base or sentence-T5-base (appendix Tab. 9; sentence-T5 brings its 768 -> 768 Dense
        # as text_projection: add --config.model.embed_dim=768), or "random"
        text=placeholder(str),
        strict=True,
    )
    config.optim = dict(
        learning_rate=1e-3,  # appendix E
        warmup_steps=2000,  # appendix E
        weight_decay=1e-2,  # appendix E
        grad_clip_norm=1.0,  # not stated in the paper
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        grad_accum_steps=1,
    )
    config.train = dict(
        steps=steps,  # one cosine period over the whole run (appendix E)
        batch_size=batch_size,  # not stated in the paper (32 GPUs); CLIP's ViT-B/16 recipes use 4k-32k
        log_every=100,
        checkpoint_every=2000,
        keep_checkpoints=3,
        max_logit_scale=math.log(100.0),
        loss_block_size=1024,  # the [B, B] similarity matrix in column blocks per device
        on_nonfinite="stop",
        profile_steps=0,
        profile_first_step=10,
    )
    config.mesh = dict(data=-1, fsdp=1, model=1)
    if pod:
        config.mesh = PODS[pod]["mesh"]
        config.model.image.remat = config.model.text.remat = PODS[pod]["remat"]
    # manual_dir / tfds_dir: where evaluators of datasets find them (clippy_jax/data/eval_datasets/README.md)
    config.eval = dict(evaluators=(), every_steps=10_000, batch_size=256, num_overlays=8, max_examples=0,
                       progress=True, manual_dir="", tfds_dir=os.path.expanduser("~/tensorflow_datasets"))
    return config
