"""Train-step throughput, JAX vs PyTorch, for the same two-tower model, on the CPU or a GPU.

  python benchmarks/train_step.py --preset=paper [--batch_size=N] [--frameworks=jax,torch,torch_compile] \
      [--steps=5] [--warmup=3] [--rounds=1] [--remat=dots|none|full] [--attention=auto|xla|cudnn] \
      [--device=auto|cpu|gpu] [--json=rows.json]

Presets (`PRESETS`): `paper` is the geometry the paper trains with: ViT-B/16 at 448x448 with 80% of the
patches dropped (157 kept patch tokens plus CLS, fed as the pipeline feeds them: `patches` [B, 157, 768]
and `patch_indices` [B, 157] of the 28x28 grid), the T5-base (v1.0) encoder at text length 64, bf16
compute with f32 parameters, spatial max pooling, LAMB (appendix D.4, E). `paper_448_full` and `paper_224`
are the same model without dropping at 448 and 224; `s16` is ViT-S/16 at 224 + T5-small in float32 (the
CPU comparison of issue 5); `tiny` is for the smoke test.

JAX: `clippy_jax`'s `TwoTower`, `make_optimizer` (optax LAMB) and jitted `make_train_step` on a
1-device mesh. PyTorch: timm's `VisionTransformer` (`global_pool='max'`: max over the patch tokens, then
`fc_norm`; with dropping, the kept patches go through its patch-embedding weights as a linear layer and
take their gathered position embeddings, then `blocks`, `norm` and `forward_head`, as a user adds
dropping to timm), transformers' `T5EncoderModel` (SDPA attention), open_clip's `ClipLoss`, timm's
`Lamb` (`always_adapt=True`, as optax applies the trust ratio to every tensor); `torch.autocast` to bf16
for bf16 presets; `torch_compile` is the same with `torch.compile(model)`. Neither framework imports
TensorFlow, and the batch is synthetic and device-resident (no input pipeline).

Each run is its own subprocess (peak memory is its own). Reported per framework: examples/s and the
median step time over the timed steps; MFU = FLOPs per step (XLA's cost analysis of the compiled JAX
step, used for both sides: the same model) / step time / peak, the peak being the data-sheet dense bf16
figure of `clippy_jax.train.perf.PEAK_FLOPS_PER_DEVICE` on a GPU or TPU and the measured matmul peak in
the compute dtype on a CPU; peak memory (`memory_stats()["peak_bytes_in_use"]` /
`torch.cuda.max_memory_allocated()` on a GPU, the process's peak RSS on a CPU); compile time (JAX: AOT
lower + compile; PyTorch: the first step, which compiles with `torch.compile`); CPU seconds per step.
"""

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

FRAMEWORKS = ("jax", "torch", "torch_compile")
RESULT_PREFIX = "RESULT "
TEMPERATURE_INIT = 0.07
MAX_LOGIT_SCALE = math.log(100.0)

# Towers: (ViT kwargs, T5 v1.0 encoder kwargs, vocabulary size, joint embedding width).
TOWERS = {
    # ViT-B/16 + T5-base encoder (configs/paper.py; appendix D.1).
    "B/16": (dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
             dict(embed_dim=768, depth=12, num_heads=12, head_dim=64, mlp_dim=3072), 32128, 512),
    # ViT-S/16 (timm vit_small_patch16_224) + T5 v1.0 small (HF t5-small's encoder).
    "S/16": (dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
             dict(embed_dim=512, depth=6, num_heads=8, head_dim=64, mlp_dim=2048), 32128, 512),
    # For the smoke test: width 32, one layer per tower.
    "tiny": (dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
             dict(embed_dim=32, depth=1, num_heads=2, head_dim=16, mlp_dim=64), 256, 32),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    towers: str
    image_size: int
    kept_patches: int  # 0: every patch
    dtype: str
    text_length: int = 64  # data.max_text_length of configs/paper.py (appendix C)
    batch_size: int = 64


PRESETS = {
    # 157 = round(784 * 0.2): data.keep_ratio=0.2 at 448 px (appendix D.4), as the pipeline keeps them.
    "paper": Preset("B/16", 448, 157, "bfloat16"),
    "paper_448_full": Preset("B/16", 448, 0, "bfloat16"),
    "paper_224": Preset("B/16", 224, 0, "bfloat16"),
    "s16": Preset("S/16", 224, 0, "float32"),
    "tiny": Preset("tiny", 32, 0, "float32", text_length=16, batch_size=4),
    "tiny_drop": Preset("tiny", 32, 6, "float32", text_length=16, batch_size=4),
}


def optim_settings() -> dict:
    """The paper's optimiser section (configs/paper.py)."""
    from configs.paper import paper_config

    return paper_config(num_examples=1, epochs=1).optim.to_dict()


def make_batch(preset: Preset, batch_size: int, seed: int = 0) -> dict:
    """Random inputs as the pipeline gives them: `image` [B, H, W, 3], or `patches` [B, K, p*p*3] in
    (p1 p2 c) order with sorted `patch_indices` [B, K]; token ids [B, L] (0 = padding, 4-36 real)."""
    import numpy as np

    image_tower, _, vocab_size, _ = TOWERS[preset.towers]
    patch, side = image_tower["patch_size"], preset.image_size // image_tower["patch_size"]
    rng = np.random.default_rng(seed)
    length = preset.text_length
    tokens = rng.integers(1, vocab_size, (batch_size, length)).astype(np.int32)
    lengths = rng.integers(min(4, length), min(36, length) + 1, batch_size)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    if not preset.kept_patches:
        image = rng.normal(size=(batch_size, preset.image_size, preset.image_size, 3)).astype(np.float32)
        return dict(image=image, tokens=tokens)
    indices = np.sort(np.argsort(rng.random((batch_size, side * side)), axis=1)[:, :preset.kept_patches], axis=1)
    patches = rng.normal(size=(batch_size, preset.kept_patches, patch * patch * 3)).astype(np.float32)
    return dict(patches=patches, patch_indices=indices.astype(np.int32), tokens=tokens)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(step, steps: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of each of `steps` calls of `step`."""
    times, cpu_times = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - wall)
        cpu_times.append(time.process_time() - cpu)
    return times, cpu_times


def run_jax(preset: Preset, batch_size: int, steps: int, warmup: int, remat: str, attention: str) -> dict:
    """Times `clippy_jax`'s jitted train step; returns the timings with `flops` per step."""
    import jax
    import ml_collections

    from clippy_jax import sharding
    from clippy_jax.models import build_model
    from clippy_jax.train import perf
    from clippy_jax.train.optimizer import make_optimizer
    from clippy_jax.train.step import batch_spec, create_train_state, make_train_step

    image, text, vocab_size, embed_dim = TOWERS[preset.towers]
    side = preset.image_size // image["patch_size"]
    tower = dict(remat=remat, attention=attention)
    model = build_model(ml_collections.ConfigDict(dict(
        image=dict(image, posemb_grid=(side, side), use_cls_token=True, norm_placement="post_pool", **tower),
        text=dict(text, vocab_size=vocab_size, activations=("relu",), **tower),
        image_pool="max", text_pool="mean", pool_temperature=0.1, project_image=True, project_text=True,
        embed_dim=embed_dim, temperature_init=TEMPERATURE_INIT,
        dtype=preset.dtype, param_dtype="float32",
    )))
    optim = ml_collections.ConfigDict(optim_settings())
    tx, schedule = make_optimizer(optim, total_steps=optim.warmup_steps + warmup + steps)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), jax.devices()[:1])
    host_batch = make_batch(preset, batch_size)
    grid = (side, side)
    state, shardings = create_train_state(model, tx, batch_spec(host_batch, 1), mesh, seed=0, grid_shape=grid)
    step = make_train_step(model, tx, schedule, shardings, mesh, max_logit_scale=MAX_LOGIT_SCALE, grid_shape=grid)
    device = jax.devices()[0]
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(host_batch, mesh)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        flops = perf.compiled_flops(compiled)
        rss_after_compile = _peak_rss_bytes()
        carry = [state, None]

        def train_step():
            carry[:] = jax.block_until_ready(compiled(carry[0], batch))

        _timed(train_step, warmup)
        times, cpu_times = _timed(train_step, steps)
    stats = device.memory_stats() or {}
    return dict(step_times=times, cpu_times=cpu_times, flops=flops, compile_s=compile_s,
                peak_memory_bytes=stats.get("peak_bytes_in_use") or _peak_rss_bytes(),
                memory_source="peak_bytes_in_use" if stats else "peak RSS", peak_rss_after_compile=rss_after_compile,
                loss=float(carry[1]["loss"]), device=device.device_kind, platform=device.platform)


def run_torch(preset: Preset, batch_size: int, steps: int, warmup: int, compile_model: bool) -> dict:
    """Times the same model's train step in PyTorch (timm ViT, transformers T5, open_clip loss, timm LAMB)."""
    import timm
    import timm.optim
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss
    from torch import nn
    from transformers import T5Config, T5EncoderModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    image, text, vocab_size, embed_dim = TOWERS[preset.towers]
    patch = image["patch_size"]

    class TwoTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_tower = timm.models.vision_transformer.VisionTransformer(
                img_size=preset.image_size, patch_size=patch, embed_dim=image["width"], depth=image["depth"],
                num_heads=image["num_heads"], mlp_ratio=image["mlp_dim"] / image["width"], num_classes=0,
                global_pool="max")
            self.text_tower = T5EncoderModel(T5Config(
                vocab_size=vocab_size, d_model=text["embed_dim"], d_kv=text["head_dim"], d_ff=text["mlp_dim"],
                num_layers=text["depth"], num_heads=text["num_heads"], feed_forward_proj="relu", dropout_rate=0.0,
                attn_implementation="sdpa"))
            self.image_projection = nn.Linear(image["width"], embed_dim, bias=False)
            self.text_projection = nn.Linear(text["embed_dim"], embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / TEMPERATURE_INIT)))

        def encode_kept_patches(self, patches, indices):
            """timm's ViT on the kept patches: embedding, gathered position embeddings, CLS, blocks."""
            vit = self.image_tower
            weight = vit.patch_embed.proj.weight.permute(0, 2, 3, 1).flatten(1)  # [D, p*p*3] in (p1 p2 c)
            x = F.linear(patches, weight, vit.patch_embed.proj.bias)  # [B, K, D]
            positions = vit.pos_embed[0, 1:][indices]  # [B, K, D]
            cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x + positions], dim=1)
            return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(x))))  # max over patches, fc_norm

        def forward(self, batch):
            if "patches" in batch:
                image_features = self.encode_kept_patches(batch["patches"], batch["patch_indices"])
            else:
                image_features = self.image_tower(batch["image"])
            tokens = batch["tokens"]
            mask = (tokens > 0).to(torch.float32)
            hidden = self.text_tower(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            scale = self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()
            image_emb = F.normalize(self.image_projection(image_features), dim=-1)
            return image_emb, F.normalize(self.text_projection(pooled), dim=-1), scale

    model = TwoTower().to(device).train()
    optim = optim_settings()
    no_decay = ("embed_tokens", "shared", "relative_attention_bias", "pos_embed", "cls_token")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not any(k in n for k in no_decay)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    optimizer = timm.optim.Lamb(
        [dict(params=decay, weight_decay=optim["weight_decay"]), dict(params=rest, weight_decay=0.0)],
        lr=optim["learning_rate"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
        max_grad_norm=optim["grad_clip_norm"], always_adapt=True)
    total, warm = optim["warmup_steps"] + warmup + steps, optim["warmup_steps"]

    def lr_factor(i):  # optax.warmup_cosine_decay_schedule from 0 to the peak and back to 0
        if i < warm:
            return i / warm
        return 0.5 * (1 + math.cos(math.pi * min(i - warm, total - warm) / (total - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batch = {}
    for key, value in make_batch(preset, batch_size).items():
        value = torch.from_numpy(value)
        if key == "image":
            value = value.permute(0, 3, 1, 2).contiguous()
        batch[key] = (value.long() if key in ("tokens", "patch_indices") else value).to(device)
    forward = torch.compile(model) if compile_model else model
    clip_loss = ClipLoss()
    losses = []

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.dtype == "bfloat16"):
            loss = clip_loss(*forward(batch))
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())  # waits for the device

    first_step, _ = _timed(train_step, 1)
    _timed(train_step, max(warmup - 1, 0))
    times, cpu_times = _timed(train_step, steps)
    on_gpu = device.type == "cuda"
    return dict(step_times=times, cpu_times=cpu_times, compile_s=first_step[0],
                peak_memory_bytes=torch.cuda.max_memory_allocated() if on_gpu else _peak_rss_bytes(),
                memory_source="max_memory_allocated" if on_gpu else "peak RSS", loss=losses[-1],
                attention=model.text_tower.config._attn_implementation,
                device=torch.cuda.get_device_name() if on_gpu else "cpu", torch=torch.__version__)


def run_peak(dtype: str, trials: int) -> dict:
    """The device's peak FLOP/s: the data sheet on a GPU or TPU, else the best of several matmul runs."""
    import jax
    import jax.numpy as jnp

    from clippy_jax.train import perf

    if jax.default_backend() != "cpu":
        peak, source = perf.device_peak_flops()
        return dict(peak_flops=peak, peak_source=source)
    peak = max(perf.measured_matmul_peak(dtype=jnp.dtype(dtype)) for _ in range(trials))
    return dict(peak_flops=peak, peak_source=f"measured {dtype} matmul, best of {trials}")


def _worker(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    if args.worker == "jax":
        return run_jax(preset, args.batch_size, args.steps, args.warmup, args.remat, args.attention)
    if args.worker in ("torch", "torch_compile"):
        return run_torch(preset, args.batch_size, args.steps, args.warmup, args.worker == "torch_compile")
    if args.worker == "peak":
        return run_peak(preset.dtype, args.peak_trials)
    raise ValueError(f"Unknown worker {args.worker!r}.")


def run_in_subprocess(worker: str, args: argparse.Namespace) -> dict:
    """Runs one worker in a fresh interpreter; returns its result with the load average at its start."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if args.device == "cpu":
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, os.path.abspath(__file__), f"--worker={worker}"] + [
        f"--{name}={getattr(args, name)}"
        for name in ("preset", "batch_size", "steps", "warmup", "remat", "attention", "peak_trials")
    ]
    load = os.getloadavg()[0]
    wall = time.perf_counter()
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode or not lines:
        raise RuntimeError(f"{worker} worker failed ({process.returncode}):\n{process.stdout[-3000:]}"
                           f"\n{process.stderr[-5000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    return dict(result, load=load, wall_s=time.perf_counter() - wall)


def benchmark(args: argparse.Namespace, frameworks: tuple[str, ...]) -> list[dict]:
    """Measures the peak, then runs the frameworks in turn, `rounds` times (jax, torch, ..., jax, torch, ...),
    each in its own subprocess; a row pools the timed steps of all its rounds."""
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown or not frameworks:
        raise ValueError(f"Unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}.")
    peak = run_in_subprocess("peak", args)
    runs = {fw: [] for fw in frameworks}
    for _ in range(args.rounds):
        for fw in frameworks:
            runs[fw].append(run_in_subprocess(fw, args))
    if "jax" in runs:
        flops = runs["jax"][0]["flops"]
    else:  # the JAX step's FLOPs: compiled and run once
        flops = run_in_subprocess("jax", argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0}))["flops"]
    rows = []
    for fw, results in runs.items():
        times = [t for r in results for t in r["step_times"]]
        cpu_times = [t for r in results for t in r["cpu_times"]]
        step_s = statistics.median(times)
        rows.append(dict(
            results[0], framework=fw, preset=args.preset, batch_size=args.batch_size, step_times=times,
            cpu_times=cpu_times, step_s=step_s, examples_per_s=args.batch_size / step_s,
            cpu_step_s=statistics.median(cpu_times),
            peak_memory_bytes=max(r["peak_memory_bytes"] for r in results), loads=[r["load"] for r in results],
            compile_s=statistics.median(r["compile_s"] for r in results), flops=flops, **peak,
            mfu=flops / step_s / peak["peak_flops"] if flops else float("nan"),
        ))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| preset | batch | framework | examples/s | step ms | MFU | peak memory | compile s | CPU s/step "
             "| load |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        loads = "/".join(f"{load:.1f}" for load in row["loads"])
        lines.append(
            f"| {row['preset']} | {row['batch_size']} | {row['framework']} | {row['examples_per_s']:.2f} "
            f"| {row['step_s'] * 1e3:.1f} | {row['mfu']:.1%} | {row['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"({row['memory_source']}) | {row['compile_s']:.1f} | {row['cpu_step_s']:.2f} | {loads} |"
        )
    row = rows[0]
    lines.append(f"\nFLOPs/step {row['flops'] / 1e9:.1f} G (XLA cost analysis of the JAX step); peak "
                 f"{row['peak_flops'] / 1e12:.3g} TFLOP/s ({row['peak_source']}); device {row['device']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="s16", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=0, help="Default: the preset's.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frameworks", default="jax,torch", help=f"Comma-separated subset of {','.join(FRAMEWORKS)}.")
    parser.add_argument("--remat", default="none",
                        help="JAX towers' remat policy (none, dots, full); configs/paper.py's default: none.")
    parser.add_argument("--attention", default="auto", help="JAX attention kernel (auto, xla, cudnn).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                        help="cpu hides accelerators from both frameworks; auto and gpu leave them visible.")
    parser.add_argument("--cpu_xla_flags", type=int, default=1,
                        help="1: the XLA:CPU flags of training (clippy_jax.train.perf.CPU_XLA_FLAGS); 0: defaults.")
    parser.add_argument("--rounds", type=int, default=1, help="Alternating runs of each framework.")
    parser.add_argument("--peak_trials", type=int, default=5, help="CPU matmul-peak measurements (the best counts).")
    parser.add_argument("--json", default="", help="Also write the rows here.")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or PRESETS[args.preset].batch_size
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(_worker(args)), flush=True)
        return
    if args.cpu_xla_flags:
        from clippy_jax.train.perf import add_cpu_xla_flags

        add_cpu_xla_flags()  # inherited by the workers
    rows = benchmark(args, tuple(f.strip() for f in args.frameworks.split(",") if f.strip()))
    print(f"{args.preset} {PRESETS[args.preset]}, batch {args.batch_size}, remat {args.remat}, attention "
          f"{args.attention}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {args.rounds} x ({args.warmup} "
          f"warm-up + {args.steps} timed steps), median step")
    print(format_table(rows), flush=True)
    for row in rows:
        extra = {k: row[k] for k in ("platform", "attention", "torch", "loss", "peak_rss_after_compile") if k in row}
        times = ", ".join(f"{t * 1e3:.1f}" for t in row["step_times"])
        print(f"{row['framework']}: step ms [{times}] (best {min(row['step_times']) * 1e3:.1f}), {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
