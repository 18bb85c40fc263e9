"""Train-step throughput on CPU, JAX vs PyTorch, for the same two-tower model (issue 5).

  .venv/bin/python benchmarks/train_step.py [--batch_size=64] [--steps=5] [--warmup=3] [--rounds=1] \
      [--frameworks=jax,torch] [--size=S/16|tiny] [--text_length=64] [--devices=1] [--json=rows.json]

Model (both frameworks, float32): ViT-S/16 at 224x224 (CLS token, final LayerNorm after a spatial max
over the patch tokens, timm's `fc_norm` with global_pool='max'), T5 v1.0 small encoder (d_model 512,
d_ff 2048, 6 layers, 8 heads, ReLU, vocab 32128), masked-mean text pooling, bias-free projections to
512, learned temperature, symmetric contrastive loss, LAMB with the paper's settings (lr schedule,
weight decay on kernels only, global-norm clipping at 1). JAX: `clippy_jax`'s `build_model`,
`make_optimizer` (optax.lamb) and jitted `make_train_step` on a 1-device mesh. PyTorch: timm
`vit_small_patch16_224` (global_pool='max', no head) + transformers `T5EncoderModel`, open_clip's
`ClipLoss`, `timm.optim.Lamb` (always_adapt=True, as optax applies the trust ratio to every tensor).

Each framework runs in its own subprocess (so neither imports the other and peak RSS is its own),
one after the other (`--rounds` > 1 alternates them: jax, torch, jax, torch, ...); a first subprocess
measures the float32 matmul peak (the best of 5 `clippy_jax.train.perf.measured_matmul_peak` calls).
The same random batch is fed every step (no input pipeline). Reported:
- step ms: median wall time of the timed steps (`--steps` per round, after `--warmup` steps);
  examples/s = batch / that median;
- MFU = model FLOPs per step / median step time / matmul peak, with the FLOPs from XLA's cost
  analysis of the compiled JAX step (the PyTorch model is the same model, so the same count is used
  for it);
- peak memory: the subprocess's peak RSS (`ru_maxrss`; JAX's CPU device has no `memory_stats`),
  imports and initialisation included;
- CPU s/step: median process CPU time per step, which other processes on a shared machine disturb
  less than wall time; CPU share = CPU time / (wall time x cores) over the timed steps (below 100%
  when other processes took cores); load: the 1-minute load average at the start of each run.
"""

import argparse
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

FRAMEWORKS = ("jax", "torch")
RESULT_PREFIX = "RESULT "
TEMPERATURE_INIT = 0.07
MAX_LOGIT_SCALE = math.log(100.0)

# size: (image tower, text tower, image size, vocab size, joint embedding width)
SIZES = {
    # ViT-S/16 (timm vit_small_patch16_224) + T5 v1.0 small (HF t5-small's encoder).
    "S/16": (dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
             dict(embed_dim=512, depth=6, num_heads=8, head_dim=64, mlp_dim=2048), 224, 32128, 512),
    # For the smoke test: width 32, one layer per tower, 32x32 images.
    "tiny": (dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
             dict(embed_dim=32, depth=1, num_heads=2, head_dim=16, mlp_dim=64), 32, 256, 32),
}


def optim_settings() -> dict:
    """The paper's optimiser section (configs/paper.py)."""
    from configs.paper import paper_config

    return paper_config(num_examples=1, epochs=1).optim.to_dict()


def make_batch(size: str, batch_size: int, text_length: int, seed: int = 0) -> dict:
    """Random images [B, H, W, 3] and token ids [B, L] (0 = padding, 20 real tokens on average)."""
    import numpy as np

    _, _, image_size, vocab_size, _ = SIZES[size]
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, vocab_size, (batch_size, text_length)).astype(np.int64)
    lengths = rng.integers(min(4, text_length), min(36, text_length) + 1, batch_size)
    tokens[np.arange(text_length)[None, :] >= lengths[:, None]] = 0
    return dict(image=image, tokens=tokens)


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


def _summary(times: list[float], cpu_times: list[float], **extra) -> dict:
    return dict(step_times=times, cpu_times=cpu_times, peak_rss_bytes=_peak_rss_bytes(), **extra)


def run_jax(size: str, batch_size: int, steps: int, warmup: int, text_length: int, devices: int = 1) -> dict:
    """Times `clippy_jax`'s jitted train step; returns the summary with `flops` per step."""
    import jax
    import ml_collections
    import numpy as np

    from clippy_jax.models import build_model
    from clippy_jax.train import sharding
    from clippy_jax.train.optimizer import make_optimizer
    from clippy_jax.train.perf import compiled_flops
    from clippy_jax.train.step import batch_spec, create_train_state, make_train_step

    image, text, image_size, vocab_size, embed_dim = SIZES[size]
    patch = image["patch_size"]
    model = build_model(ml_collections.ConfigDict(dict(
        image=dict(image, posemb_grid=(image_size // patch,) * 2, use_cls_token=True, norm_placement="post_pool"),
        text=dict(text, vocab_size=vocab_size, activations=("relu",)),
        image_pool="max", text_pool="mean", embed_dim=embed_dim, temperature_init=TEMPERATURE_INIT,
        dtype="float32", param_dtype="float32",
    )))
    optim = ml_collections.ConfigDict(optim_settings())
    tx, schedule = make_optimizer(optim, total_steps=optim.warmup_steps + warmup + steps)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=devices, fsdp=1, model=1)), jax.devices()[:devices])
    host_batch = make_batch(size, batch_size, text_length)
    host_batch["tokens"] = host_batch["tokens"].astype(np.int32)
    state, shardings = create_train_state(model, tx, batch_spec(host_batch, 1), mesh, seed=0)
    step = make_train_step(model, tx, schedule, shardings, mesh, max_logit_scale=MAX_LOGIT_SCALE)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(host_batch, mesh)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        flops = compiled_flops(compiled)
        flops = flops and flops * devices  # the cost analysis is per device
        if not steps:  # FLOPs only
            return dict(flops=flops, compile_s=compile_s)
        rss_before_steps = _peak_rss_bytes()
        carry = [state, None]

        def train_step():
            carry[:] = jax.block_until_ready(compiled(carry[0], batch))

        _timed(train_step, warmup)
        times, cpu_times = _timed(train_step, steps)
        metrics = carry[1]
    return _summary(times, cpu_times, flops=flops, compile_s=compile_s,
                    rss_before_steps_bytes=rss_before_steps, loss=float(metrics["loss"]),
                    devices=len(mesh.devices.flat))


def run_torch(size: str, batch_size: int, steps: int, warmup: int, text_length: int) -> dict:
    """Times the same model's train step in PyTorch (timm ViT, transformers T5, open_clip loss, timm LAMB)."""
    import numpy as np
    import timm
    import timm.optim
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import T5Config, T5EncoderModel

    try:
        from open_clip.loss import ClipLoss

        clip_loss, loss_source = ClipLoss(), "open_clip.loss.ClipLoss"
    except ImportError:  # the same loss: mean of the two cross-entropies over the in-batch logits

        def clip_loss(image_features, text_features, logit_scale):
            logits = logit_scale * image_features @ text_features.T
            labels = torch.arange(logits.shape[0])
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        loss_source = "inline ClipLoss"

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    image, text, image_size, vocab_size, embed_dim = SIZES[size]

    class TwoTower(nn.Module):
        def __init__(self):
            super().__init__()
            if size == "S/16":
                self.image_tower = timm.create_model(
                    "vit_small_patch16_224", pretrained=False, num_classes=0, global_pool="max")
            else:
                self.image_tower = timm.models.vision_transformer.VisionTransformer(
                    img_size=image_size, patch_size=image["patch_size"], embed_dim=image["width"],
                    depth=image["depth"], num_heads=image["num_heads"], mlp_ratio=image["mlp_dim"] / image["width"],
                    num_classes=0, global_pool="max")
            self.text_tower = T5EncoderModel(T5Config(
                vocab_size=vocab_size, d_model=text["embed_dim"], d_kv=text["head_dim"], d_ff=text["mlp_dim"],
                num_layers=text["depth"], num_heads=text["num_heads"], feed_forward_proj="relu", dropout_rate=0.0))
            self.image_projection = nn.Linear(image["width"], embed_dim, bias=False)
            self.text_projection = nn.Linear(text["embed_dim"], embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / TEMPERATURE_INIT)))

        def forward(self, images, tokens):
            image_emb = self.image_projection(self.image_tower(images))  # max over patches, then fc_norm
            mask = (tokens > 0).to(torch.float32)
            hidden = self.text_tower(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
            text_emb = self.text_projection((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
            scale = self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()
            return F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), scale

    model = TwoTower().train()
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
    host_batch = make_batch(size, batch_size, text_length)
    images = torch.from_numpy(np.ascontiguousarray(host_batch["image"].transpose(0, 3, 1, 2)))
    tokens = torch.from_numpy(host_batch["tokens"])

    losses = []

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = clip_loss(*model(images, tokens))
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())

    rss_before_steps = _peak_rss_bytes()
    _timed(train_step, warmup)
    times, cpu_times = _timed(train_step, steps)
    return _summary(times, cpu_times, rss_before_steps_bytes=rss_before_steps, loss=losses[-1],
                    threads=torch.get_num_threads(), loss_source=loss_source,
                    attention=model.text_tower.config._attn_implementation)


def run_peak(trials: int = 5) -> dict:
    """The best of several `measured_matmul_peak` calls (other processes only ever lower a measurement)."""
    from clippy_jax.train.perf import measured_matmul_peak

    return dict(peak_flops=max(measured_matmul_peak() for _ in range(trials)))


def _worker(args: argparse.Namespace) -> dict:
    if args.worker == "jax":
        return run_jax(args.size, args.batch_size, args.steps, args.warmup, args.text_length, args.devices)
    if args.worker == "torch":
        return run_torch(args.size, args.batch_size, args.steps, args.warmup, args.text_length)
    if args.worker == "peak":
        return run_peak(args.peak_trials)
    raise ValueError(f"Unknown worker {args.worker!r}.")


def run_in_subprocess(worker: str, size: str, batch_size: int, steps: int, warmup: int, text_length: int,
                      devices: int = 1, peak_trials: int = 5) -> dict:
    """Runs one worker in a fresh interpreter; returns its result with the load average at its start."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if worker == "jax" and devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    command = [sys.executable, os.path.abspath(__file__), f"--worker={worker}", f"--size={size}",
               f"--batch_size={batch_size}", f"--steps={steps}", f"--warmup={warmup}",
               f"--text_length={text_length}", f"--devices={devices}", f"--peak_trials={peak_trials}"]
    load = os.getloadavg()[0]
    wall = time.perf_counter()
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode or not lines:
        raise RuntimeError(f"{worker} worker failed ({process.returncode}):\n{process.stdout[-3000:]}"
                           f"\n{process.stderr[-5000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    return dict(result, load=load, wall_s=time.perf_counter() - wall)


def benchmark(frameworks: tuple[str, ...] = FRAMEWORKS, size: str = "S/16", batch_size: int = 64, steps: int = 5,
              warmup: int = 3, text_length: int = 64, devices: int = 1, rounds: int = 1,
              peak_trials: int = 5) -> tuple[list[dict], str]:
    """Measures the matmul peak, then runs the frameworks in turn, `rounds` times (jax, torch, jax, torch, ...),
    each run in its own subprocess; returns (rows, table). A row pools the timed steps of all its rounds."""
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown or not frameworks:
        raise ValueError(f"Unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}.")
    peak = run_in_subprocess("peak", size, batch_size, steps, warmup, text_length, peak_trials=peak_trials)
    peak = peak["peak_flops"]
    runs = {fw: [] for fw in frameworks}
    for _ in range(rounds):
        for fw in frameworks:
            runs[fw].append(run_in_subprocess(fw, size, batch_size, steps, warmup, text_length, devices))
    if "jax" in runs:
        flops = runs["jax"][0]["flops"]
    else:  # the JAX step's FLOPs: compiled, not run
        flops = run_in_subprocess("jax", size, batch_size, 0, 0, text_length)["flops"]
    rows = []
    for fw, results in runs.items():
        times = [t for r in results for t in r["step_times"]]
        cpu_times = [t for r in results for t in r["cpu_times"]]
        step_s = statistics.median(times)
        rows.append(dict(
            results[0],
            framework=fw,
            step_times=times,
            cpu_times=cpu_times,
            step_s=step_s,
            examples_per_s=batch_size / step_s,
            cpu_step_s=statistics.median(cpu_times),
            cpu_share=sum(cpu_times) / (sum(times) * os.cpu_count()),
            peak_rss_bytes=max(r["peak_rss_bytes"] for r in results),
            loads=[r["load"] for r in results],
            flops=flops,
            peak_flops=peak,
            mfu=flops / step_s / peak if flops else float("nan"),
        ))
    return rows, format_table(rows)


def format_table(rows: list[dict]) -> str:
    lines = ["| framework | examples/s | step ms | MFU | peak memory | CPU s/step | CPU share | load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        loads = "/".join(f"{load:.1f}" for load in row["loads"])
        lines.append(
            f"| {row['framework']} | {row['examples_per_s']:.2f} | {row['step_s'] * 1e3:.0f} | {row['mfu']:.1%} "
            f"| {row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['cpu_step_s']:.1f} | {row['cpu_share']:.0%} "
            f"| {loads} |"
        )
    row = rows[0]
    lines.append(f"\nFLOPs/step {row['flops'] / 1e9:.1f} G (XLA cost analysis of the JAX step), "
                 f"matmul peak {row['peak_flops'] / 1e9:.1f} GFLOP/s, {os.cpu_count()} cores")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frameworks", default="jax,torch", help="Comma-separated subset of jax,torch.")
    parser.add_argument("--size", default="S/16", choices=sorted(SIZES))
    parser.add_argument("--text_length", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1, help="JAX CPU devices (data-parallel mesh).")
    parser.add_argument("--rounds", type=int, default=1, help="Alternating runs of each framework.")
    parser.add_argument("--peak_trials", type=int, default=5, help="Matmul-peak measurements (the best counts).")
    parser.add_argument("--json", default="", help="Also write the rows here.")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(_worker(args)), flush=True)
        return
    frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    rows, table = benchmark(frameworks, args.size, args.batch_size, args.steps, args.warmup, args.text_length,
                            args.devices, args.rounds, args.peak_trials)
    print(f"{args.size}, batch {args.batch_size}, text length {args.text_length}, {args.rounds} x ({args.warmup} "
          f"warm-up + {args.steps} timed steps) per framework, median step")
    print(table)
    for row in rows:
        extra = {k: row[k] for k in ("compile_s", "devices", "threads", "loss_source", "attention", "loss") if k in row}
        times = ", ".join(f"{t * 1e3:.0f}" for t in row["step_times"])
        print(f"{row['framework']}: step ms [{times}] (best {min(row['step_times']) * 1e3:.0f}), RSS before steps "
              f"{row['rss_before_steps_bytes'] / 2**30:.2f} GiB, {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
