"""clippy_jax: CLIPpy (perceptual grouping in contrastive vision-language models) in JAX/Flax."""
