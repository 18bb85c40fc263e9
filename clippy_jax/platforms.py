"""Every choice that depends on the hardware, taken from the devices a function is compiled for.

Every jitted function of the project that runs the towers (the train step, the evaluators' batch function,
the inference functions) is made by `jit(fn, mesh_or_device)`: traced with the platform of those devices
bound (`compiled_for`), which the towers read (`current`), and compiled with that platform's XLA options.
So a process whose default backend is the CPU compiles the GPU's code paths for a mesh of GPUs
(deviceless ahead-of-time compilation in `clippy_jax.plan`), and the other way round. Outside any
binding (a module applied directly), the platform is the default device's, where such a function runs.

Platforms are `jax.Device.platform` names: 'cpu', 'gpu' (CUDA), 'tpu'.
"""

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
_BOUND: contextvars.ContextVar[str | None] = contextvars.ContextVar("clippy_jax_platform", default=None)

# Attention kernels of `jax.nn.dot_product_attention`: 'auto' takes cuDNN's flash attention on a GPU
# for 16-bit compute where cuDNN supports the shapes, and XLA's kernel elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")

# XLA options per platform, passed to the compiler with each program (`jax.jit(compiler_options=...)`), so that a
# program gets its target's options whatever the process's default backend. A flag set in XLA_FLAGS wins.
# CPU: the memory-optimised scheduler orders the step's ops so that fewer activations are live at once (XLA's
# temporaries for the ViT-S/16 + T5-small step at batch 64: 6.9 GiB instead of 10.0; BENCHMARKS.md, "Train step").
# GPU: JAX's GPU performance guide: the latency-hiding scheduler overlaps the gradient all-reduces (and FSDP's
# all-gathers / reduce-scatters) with the backward pass on a high-priority stream, and collectives are combined
# up to 128 MiB (a few large ones instead of one per parameter).
COMPILER_OPTIONS: dict[str, dict[str, object]] = {
    "cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "gpu": {
        "xla_gpu_enable_latency_hiding_scheduler": True,
        "xla_gpu_enable_highest_priority_async_stream": True,
        "xla_gpu_all_reduce_combine_threshold_bytes": 134217728,
        "xla_gpu_all_gather_combine_threshold_bytes": 134217728,
        "xla_gpu_reduce_scatter_combine_threshold_bytes": 134217728,
    },
    "tpu": {},
}


def platform_of(devices: jax.sharding.Mesh | jax.Device | Sequence[jax.Device]) -> str:
    """The platform of a mesh's devices, of one device, or of a list of devices (all of one platform)."""
    if isinstance(devices, jax.sharding.Mesh):
        devices = list(devices.devices.flat)
    elif isinstance(devices, jax.Device):
        devices = [devices]
    found = {"gpu" if d.platform in ("cuda", "rocm") else d.platform for d in devices}
    if len(found) != 1:
        raise ValueError(f"Devices of several platforms in one program: {sorted(found)}.")
    return found.pop()


@contextlib.contextmanager
def compiled_for(platform: str) -> Iterator[None]:
    """While a function is traced: the towers take `platform`'s code paths."""
    if platform not in PLATFORMS:
        raise ValueError(f"Unknown platform {platform!r}; expected one of {PLATFORMS}.")
    token = _BOUND.set(platform)
    try:
        yield
    finally:
        _BOUND.reset(token)


def current() -> str:
    """The platform bound by `compiled_for`, else the default device's."""
    return _BOUND.get() or platform_of(jax.devices()[0])


def cpu_bf16_dots(platform: str) -> bool:
    """Whether bf16 matmuls take `layers.bf16_matmul` (bf16 x bf16 -> f32 dots that XLA:CPU runs on its bf16
    kernels). On GPUs and TPUs a plain bf16 dot already runs on the matrix units, and XLA:GPU's tiling
    rejects the f32-output form for some shapes."""
    return platform == "cpu"


def depthwise_by_shifts(platform: str) -> bool:
    """Whether depthwise convolutions (`efficientnet.DepthwiseConv`) run as k * k shifted multiply-adds: XLA:CPU's
    grouped convolutions, and their gradients (grouped over the batch), compile and run several times slower
    (the tiny EfficientNet's train step: BENCHMARKS.md); GPUs and TPUs have depthwise convolution kernels."""
    return platform == "cpu"


def orders_remat_by_data(platform: str) -> bool:
    """Whether a rematerialised block orders its backward pass by data dependencies
    (`layers.RematTransformerBlock`): XLA:CPU drops the optimisation barriers of `jax.checkpoint`."""
    return platform == "cpu"


def attention_implementation(name: str, dtype: jnp.dtype, head_dim: int, platform: str) -> str:
    """The `implementation` argument of `jax.nn.dot_product_attention` for a tower's `attention` setting:
    'auto' takes cuDNN on a GPU for 16-bit compute and head dimensions it supports (a multiple of 8, at most
    128). (Odd sequence lengths, which cuDNN does not train on, are padded by `layers.MultiHeadAttention`.)"""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention={name!r}; choose from {ATTENTION_IMPLEMENTATIONS}.")
    if name != "auto":
        return name
    cudnn_shapes = head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if platform == "gpu" and jnp.dtype(dtype).itemsize == 2 and cudnn_shapes else "xla"


def compiler_options(platform: str) -> dict[str, object]:
    """`COMPILER_OPTIONS[platform]` less the options that XLA_FLAGS sets (the user's flags win)."""
    user = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in COMPILER_OPTIONS[platform].items() if f"--{k}=" not in user and f"--{k} " not in user}


def jit(fn: Callable, devices: jax.sharding.Mesh | jax.Device, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` for the platform of `devices` (the mesh or device it is compiled for): traced
    under `compiled_for` that platform and compiled with its `compiler_options`."""
    platform = platform_of(devices)

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        with compiled_for(platform):
            return fn(*args, **kwargs)

    return jax.jit(bound, compiler_options=compiler_options(platform), **jit_kwargs)
