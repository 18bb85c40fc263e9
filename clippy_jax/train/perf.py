"""Throughput accounting: FLOPs per step from XLA's cost analysis and model FLOPs utilisation."""

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (chip or GPU), from the vendors' data sheets.
PEAK_FLOPS_PER_DEVICE: dict[str, float] = {
    "TPU v2": 45e12 / 2,  # per core; a v2 chip has two
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # Trillium (v6e)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
    "NVIDIA V100": 125e12,
}


def cost_analysis(compiled: jax.stages.Compiled) -> dict | None:
    """XLA's cost analysis of a compiled program (one dict, whichever form the backend returns), if it has one."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    return analysis or None


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one call of a compiled (per-device, SPMD-partitioned) program, if XLA reports them."""
    analysis = cost_analysis(compiled)
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def measured_matmul_peak(size: int = 2048, repeats: int = 5, dtype: jnp.dtype = jnp.float32) -> float:
    """FLOP/s of a [size, size] matmul in `dtype` on the default device (the CPU's practical peak)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, peak in sorted(PEAK_FLOPS_PER_DEVICE.items(), key=lambda item: -len(item[0])):
        if kind.startswith(name) or name in kind:
            return peak, f"data sheet ({name})"
    return measured_matmul_peak(), f"measured float32 matmul on {kind}"
