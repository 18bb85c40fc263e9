"""The paper's optimiser (appendix E): LAMB with linear warm-up and one cosine decay over the run."""

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `config.learning_rate`, then cosine decay to 0 at `total_steps`
    (without warm-up steps, the cosine decay alone)."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if warmup == 0:
        return optax.cosine_decay_schedule(config.learning_rate, decay_steps=max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def weight_decay_mask(params) -> object:
    """True for dense kernels only: biases, norms, embeddings and the temperature are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (transformation, learning-rate schedule) from the `optim` config section."""
    schedule = learning_rate_schedule(config, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.lamb(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                   weight_decay=config.weight_decay, mask=weight_decay_mask),
    )
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx, schedule
