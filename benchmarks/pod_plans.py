"""The launch plans of `configs/cc12m.py` at the paper's batch, compiled by each target's own compiler (XLA:GPU,
XLA:TPU) on this CPU machine, next to the XLA:CPU stand-in where it is affordable; prints one markdown table.

    python benchmarks/pod_plans.py [--rows=h100x32,v5e-256,...] [--stand_in_max_devices=32]

Each row compiles the paper's train step for its mesh (minutes per row on 2 cores; BENCHMARKS.md, "Pod plans").
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@dataclasses.dataclass(frozen=True)
class Row:
    target: str
    count: int = 0  # GPUs
    topology: str = ""  # TPU slice
    mesh: tuple[tuple[str, int], ...] = (("data", -1),)
    remat: str = "none"


ROWS = {
    "h100x32": Row("NVIDIA H100", count=32),
    "h100x32-fsdp8": Row("NVIDIA H100", count=32, mesh=(("data", -1), ("fsdp", 8))),
    "a100x32": Row("NVIDIA A100", count=32),
    "h200x8": Row("NVIDIA H200", count=8),
    "v4-64": Row("TPU v4", topology="2x4x4"),  # 32 chips (64 TensorCores), megacore
    "v5e-256": Row("TPU v5e", topology="16x16"),
    "v5p-128": Row("TPU v5p", topology="4x4x4"),  # 64 chips (128 TensorCores), megacore
    "v5e-16": Row("TPU v5e", topology="4x4"),
    "v5e-16-dots": Row("TPU v5e", topology="4x4", remat="dots"),
    "v5e-32": Row("TPU v5e", topology="4x8"),
    "v5e-8": Row("TPU v5e", topology="2x4"),
    "v5e-8-dots": Row("TPU v5e", topology="2x4", remat="dots"),
    "v5e-8-full": Row("TPU v5e", topology="2x4", remat="full"),
    "v5e-8-fsdp8-full": Row("TPU v5e", topology="2x4", mesh=(("data", -1), ("fsdp", 8)), remat="full"),
    "v5e-4-full": Row("TPU v5e", topology="2x2", remat="full"),
}


def _config(row: Row):
    spec = importlib.util.spec_from_file_location("cc12m", os.path.join(REPO, "configs", "cc12m.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.mesh.update(dict(row.mesh))
    config.model.image.remat = config.model.text.remat = row.remat
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--stand_in_max_devices", type=int, default=32,
                        help="compile the XLA:CPU stand-in too for rows of at most this many devices")
    args = parser.parse_args()
    names = args.rows.split(",")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.stand_in_max_devices)

    from clippy_jax import config_checks, plan, targets

    print("| row | devices (mesh) | remat | batch / device | compiler | peak GB / device | CPU stand-in peak GB | "
          "fits | collectives GB / step | roofline step s | MFU | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        row = ROWS[name]
        config = _config(row)
        devices = targets.target_devices(row.target, row.count, row.topology)
        config_checks.validate(config, len(devices), paths=False)
        start = time.perf_counter()
        report = plan.make_plan(config, devices, row.target, check_advice=False)
        seconds = time.perf_counter() - start
        stand_in = "-"
        if len(devices) <= args.stand_in_max_devices:
            cpu = plan.make_plan(config, jax.devices()[:len(devices)], row.target, check_advice=False)
            stand_in = f"{cpu['peak'] / 1e9:.2f}"
        mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1)
        wire = sum(c.count * c.bytes for c in report.get("collectives", [])) / 1e9
        timing = (f"{report['step_s']:.3f} | {report['mfu']:.0%}" if "step_s" in report else "- | -")
        needs = f"needs {report['peak'] / 1e9:.1f} of {report['memory_bytes'] / 1e9:.1f}"
        verdict = "yes" if report["fits"] else f"no ({needs})"
        print(f"| {name} | {len(devices)} ({mesh}) | {row.remat} | {config.train.batch_size // len(devices)} | "
              f"{report['compiler'].split(' (')[0]} | {report['peak'] / 1e9:.2f} | {stand_in} | {verdict} | "
              f"{wire:.2f} | {timing} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
