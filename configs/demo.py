"""The embedded demo: CLIPpy on synthetic captioned scenes, trained and evaluated on a laptop CPU.

Config string arguments select variants: `configs/demo.py:pool=avg` (max | avg | cls),
`configs/demo.py:stride=4` (overlapping 8x8 patches 4 pixels apart, a 15x15 grid, of which the 64
tokens of the default 8x8 grid are sub-sampled per image during training: paper appendix E),
`configs/demo.py:pool=max,size=tiny` (the tiny size is for tests).
"""

import math

import ml_collections

# size: (ViT width, depth, heads, mlp; T5 width, depth, heads, mlp; steps; batch; train examples)
SIZES = {
    "demo": (128, 4, 4, 512, 128, 2, 4, 512, 2000, 64, 24000),
    "tiny": (32, 1, 2, 64, 32, 1, 2, 64, 6, 16, 256),
}


def _parse(arg: str) -> dict[str, str]:
    options = dict(pool="max", size="demo", stride="8")
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key not in options:
            raise ValueError(f"Unknown demo config argument {key!r}; known: {sorted(options)} (e.g. pool=avg).")
        options[key] = value
    if options["size"] not in SIZES:
        raise ValueError(f"Unknown size={options['size']!r}; choose from {sorted(SIZES)}.")
    if not options["stride"].isdigit():
        raise ValueError(f"stride={options['stride']!r} must be a positive integer (pixels between patches).")
    return options


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = _parse(arg)
    vit_width, vit_depth, vit_heads, vit_mlp, t5_width, t5_depth, t5_heads, t5_mlp, steps, batch, examples = SIZES[
        options["size"]]
    patch, stride = 8, int(options["stride"])
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = dict(
        source="synthetic",  # or img2dataset_tfrecord | webdataset | tfds (clippy_jax/data/README.md)
        train_pattern="",
        eval_pattern="",
        tokenizer_path="",
        image_key="jpg,jpeg,png,webp",  # comma-separated alternatives, first present wins (case-insensitive)
        text_key="txt",  # comma-separated caption features, one drawn per example ("captions/text", "json:caption")
        tfds_name="",  # source=tfds: e.g. "coco_captions"
        tfds_data_dir="",
        tfds_split="train",
        crop="random",  # random | center crop of the longer side
        image_size=64,  # cut into the patches of config.model.image (patch_size, patch_stride)
        keep_ratio=1.0,  # the demo keeps every patch; the paper drops 80% at 2x resolution
        # stride < patch: keep the sequence length of the non-overlapping grid (paper appendix E)
        keep_patches=0 if stride == patch else (64 // patch) ** 2,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        max_text_length=24,
        shuffle_buffer=2048,
        interleave=8,
        prefetch=4,
        max_input_wait_seconds=300.0,  # stop when no batch arrives, or a start-up read does not answer, for this long
        max_consecutive_skips=10_000,  # ... or when this many records in a row are unusable
        synthetic=dict(
            directory="",  # empty: <workdir>/data
            seed=1234,
            image_size=64,
            train_examples=examples,
            eval_examples=max(examples // 48, 64),
            train_shards=8,
            vocab_size=512,
            workers=0,  # 0: one per CPU core
        ),
    )
    config.model = dict(
        image=dict(
            patch_size=patch, patch_stride=stride, width=vit_width, depth=vit_depth, num_heads=vit_heads,
            mlp_dim=vit_mlp, posemb_grid=(8, 8), use_cls_token=True,
            remat="none",  # or a policy ("dots", "full") that trades recomputation for memory
        ),
        text=dict(
            vocab_size=0,  # 0: the size of the tokenizer trained on the demo captions
            embed_dim=t5_width, depth=t5_depth, num_heads=t5_heads, head_dim=t5_width // t5_heads,
            mlp_dim=t5_mlp, activations=("gelu_tanh", "linear"), remat="none",
        ),
        image_pool=options["pool"],  # CLIPpy: spatial max (paper Sec. 3)
        text_pool="mean",  # paper appendix Tab. 8
        pool_temperature=0.1,  # softmax temperature of the 'wmp' and 'tsp' heads (appendix Tab. 10)
        project_image=True,  # bias-free dense layers into the joint space
        project_text=True,
        embed_dim=128,
        temperature_init=0.07,
        dtype="float32",
        param_dtype="float32",
    )
    config.init = dict(
        image="random",  # or a directory written by `python -m clippy_jax.convert` (e.g. DINO)
        text="random",  # or a converted T5 / sentence-T5 checkpoint
        strict=True,  # refuse checkpoints with missing, unexpected or mis-shaped keys
    )
    config.optim = dict(
        learning_rate=1e-3,  # paper appendix E
        warmup_steps=steps // 10,  # the paper warms up 2000 steps of a much longer run
        weight_decay=1e-2,  # paper appendix E
        grad_clip_norm=1.0,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        grad_accum_steps=1,
    )
    config.train = dict(
        steps=steps,
        batch_size=batch,
        log_every=50 if options["size"] == "demo" else 2,
        checkpoint_every=250 if options["size"] == "demo" else 3,
        keep_checkpoints=2,
        max_logit_scale=math.log(100.0),  # CLIP clips 1 / tau at 100
        loss_block_size=0,  # > 0: similarity matrix in blocks of this many columns per device
        on_nonfinite="stop",  # or "skip": leave the update out and go on
        profile_steps=0,  # > 0: capture a profiler trace of this many steps
        profile_first_step=10,  # steps after the start (or resume) at which the capture begins
    )
    config.mesh = dict(data=-1, fsdp=1, model=1)
    config.eval = dict(
        evaluators=("synthetic_segmentation",),
        every_steps=0,  # > 0: also evaluate during training
        batch_size=64,
        num_overlays=6,
        max_examples=0,  # > 0: only the first examples of each split
        progress=True,  # progress bars on the console
    )
    return config
