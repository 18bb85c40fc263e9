"""Validation of a config before anything is compiled, with messages that name the setting."""

import ml_collections

from clippy_jax.models.pooling import IMAGE_POOLS, TEXT_POOLS, lookup
from clippy_jax.train.sharding import mesh_shape


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Raises ValueError for settings that would fail (or silently misbehave) later."""
    lookup(IMAGE_POOLS, config.model.image_pool, "model.image_pool")
    lookup(TEXT_POOLS, config.model.text_pool, "model.text_pool")
    for tower in ("image", "text"):
        if config.init[tower] is None:
            raise ValueError(f"config.init.{tower} is required: a directory written by `python -m clippy_jax.convert` "
                             f"or 'random'; pass --config.init.{tower}=...")
    data, fsdp, _ = mesh_shape(config.mesh, num_devices)
    batch = config.train.batch_size
    if batch % (data * fsdp):
        raise ValueError(
            f"config.train.batch_size={batch} is not divisible by the {data * fsdp} data-parallel devices "
            f"(mesh data={data} x fsdp={fsdp} of {num_devices} devices); use a multiple of {data * fsdp}."
        )
    if config.train.loss_block_size and IMAGE_POOLS[config.model.image_pool].text_conditioned:
        raise ValueError(f"config.model.image_pool={config.model.image_pool!r} pools per text and needs the full "
                         "similarity matrix; set config.train.loss_block_size=0.")
    if config.train.loss_block_size and batch % config.train.loss_block_size:
        raise ValueError(f"config.train.loss_block_size={config.train.loss_block_size} must divide "
                         f"config.train.batch_size={batch}.")
    if batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} is not divisible by the {process_count} processes.")
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.train.on_nonfinite={config.train.on_nonfinite!r}; choose 'stop' or 'skip'.")
    patch, stride = config.model.image.patch_size, config.model.image.get("patch_stride") or 0
    if config.data.patch_size != patch:
        raise ValueError(f"config.data.patch_size={config.data.patch_size} differs from config.model.image.patch_size="
                         f"{patch}; set both to the same value.")
    if not 0 <= stride <= patch:
        raise ValueError(f"config.model.image.patch_stride={stride} must be in [1, {patch}] (the patch size).")
    if (config.data.image_size - patch) % (stride or patch):
        raise ValueError(
            f"config.data.image_size={config.data.image_size} is not covered by {patch}-pixel patches "
            f"{stride or patch} pixels apart (config.model.image.patch_size / patch_stride); use an image size "
            f"of {patch} + a multiple of {stride or patch}."
        )
