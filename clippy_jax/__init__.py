"""clippy_jax: CLIPpy (perceptual grouping in contrastive vision-language models) in JAX/Flax."""

from clippy_jax import logs

logs.quiet_native_libraries()  # before anything imports TensorFlow
