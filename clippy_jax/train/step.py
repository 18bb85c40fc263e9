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
    """`batch_stats`: the BatchNorm running statistics of a CNN image tower ({} for models without BatchNorm),
    updated by every train step from the global batch's statistics and used in evaluation."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    batch_stats: dict = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """The Flax variables to evaluate: {'params': ..., 'batch_stats': ...}."""
        return {"params": self.params, "batch_stats": self.batch_stats}


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
    parameters, optimiser state and BatchNorm statistics follow the logical axis rules.
    """

    def init_variables(rng: jax.Array) -> tuple[dict, dict]:
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch.items()}
        variables = model.init(rng, batch, grid_shape)
        return variables["params"], variables.get("batch_stats", {})

    rng = jax.random.key(seed)
    abstract_params, abstract_batch_stats = jax.eval_shape(init_variables, rng)
    param_shardings = sharding.logical_shardings(nn.get_partition_spec(abstract_params), mesh)
    batch_stats_shardings = sharding.logical_shardings(nn.get_partition_spec(abstract_batch_stats), mesh)
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
        step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings, rng=sharding.replicated(mesh),
        batch_stats=batch_stats_shardings,
    )

    def init_state(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params, batch_stats = nn.unbox(init_variables(params_rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                          batch_stats=batch_stats)

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

    The model runs in training mode: a CNN tower's BatchNorm normalises with the statistics of the global
    batch (under `jit` its means over the batch-sharded axis are global reductions, so every device sees
    the same statistics as one device would) and the step returns its updated running statistics; drop
    path draws from the state's rng folded with the step.

    `metrics["nonfinite"]` is 1 when the loss, the gradients or the updated parameters hold a NaN or
    Inf; with `skip_nonfinite` such an update is not applied (the step counter still advances).
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            with sharding.bind_mesh(mesh):
                out, updated = model.apply({"params": params, "batch_stats": state.batch_stats}, batch, grid_shape,
                                           train=True, mutable=["batch_stats"],
                                           rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
            if loss_block_size:
                loss, metrics = blocked_contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                                         max_logit_scale, mesh, sharding.BATCH_AXES, loss_block_size)
            else:
                loss, metrics = contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                                 max_logit_scale)
            return loss, (metrics, updated.get("batch_stats", {}))

        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        if skip_nonfinite:
            params, opt_state, batch_stats = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (params, opt_state, batch_stats),
                (state.params, state.opt_state, state.batch_stats)
            )
        metrics = dict(
            metrics,
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=schedule(state.step),
            nonfinite=1.0 - finite.astype(jnp.float32),
        )
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)
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

