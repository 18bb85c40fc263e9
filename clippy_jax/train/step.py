"""Train state, its sharded initialisation, and the jitted contrastive train step."""

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from clippy_jax import platforms, sharding
from clippy_jax.train.loss import blocked_contrastive_loss, contrastive_loss


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array

def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_batch: Mapping[str, jax.ShapeDtypeStruct],
    mesh: Mesh,
    seed: int,
    grid_shape: Sequence[int] | None = None,
) -> tuple[TrainState, TrainState, Callable[[jax.Array], TrainState]]:
    """The train state's shapes with their shardings (nothing is allocated).

    Returns (abstract state of `jax.ShapeDtypeStruct`s, state shardings, init function of the rng);
    parameters and optimiser state follow the logical axis rules.
    """

    def init_params(rng: jax.Array):
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch.items()}
        return model.init(rng, batch, grid_shape)["params"]

    rng = jax.random.key(seed)
    abstract_params = jax.eval_shape(init_params, rng)
    param_shardings = sharding.logical_shardings(nn.get_partition_spec(abstract_params), mesh)
    abstract_opt_state = jax.eval_shape(tx.init, nn.unbox(abstract_params))
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    state_shardings = TrainState(
        step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings, rng=sharding.replicated(mesh)
    )

    def init_state(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = nn.unbox(init_params(params_rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)

    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  jax.eval_shape(init_state, rng), state_shardings)
    return abstract_state, state_shardings, init_state


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_batch: Mapping[str, jax.ShapeDtypeStruct],
    mesh: Mesh,
    seed: int,
    grid_shape: Sequence[int] | None = None,
) -> tuple[TrainState, TrainState]:
    """Initialises the train state directly into its shardings.

    Returns (state, state_shardings); parameters and optimiser state follow the logical axis rules.
    """
    _, state_shardings, init_state = abstract_train_state(model, tx, example_batch, mesh, seed, grid_shape)
    state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(seed))
    return state, state_shardings

def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: TrainState,
    mesh: Mesh,
    max_logit_scale: float,
    grid_shape: Sequence[int] | None = None,
    skip_nonfinite: bool = False,
    loss_block_size: int = 0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the jitted step (state, global batch) -> (state, metrics); the state is donated. The towers'
    code paths and the XLA options are those of the mesh's platform (`platforms`), whatever the default backend.

    With `loss_block_size` > 0 the similarity matrix is computed in column blocks per device
    (`blocked_contrastive_loss`), for global batches whose [B, B] matrix would not fit.

    `metrics["nonfinite"]` is 1 when the loss, the gradients or the updated parameters hold a NaN or
    Inf; with `skip_nonfinite` such an update is not applied (the step counter still advances).
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            with sharding.bind_mesh(mesh):
                out = model.apply({"params": params}, batch, grid_shape)
            if loss_block_size:
                return blocked_contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                                max_logit_scale, mesh, sharding.BATCH_AXES, loss_block_size)
            return contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"], max_logit_scale)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        if skip_nonfinite:
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
            )
        metrics = dict(
            metrics,
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=schedule(state.step),
            nonfinite=1.0 - finite.astype(jnp.float32),
        )
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return platforms.jit(
        train_step,
        mesh,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

def batch_spec(local_batch: Mapping[str, jax.typing.ArrayLike], num_processes: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global-batch shapes from one process's batch (the leading axis grows by the process count)."""
    return {
        k: jax.ShapeDtypeStruct((v.shape[0] * num_processes, *v.shape[1:]), v.dtype) for k, v in local_batch.items()
    }

