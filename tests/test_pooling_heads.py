"""Image pooling heads own their properties: each head equals a float64 numpy reference, declares what
the paper says it needs, and a new head with a learned parameter is added by registering one class."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clippy_jax import config_checks, sharding
from clippy_jax.evaluate import zero_shot
from clippy_jax.models import build_model
from clippy_jax.models.pooling import IMAGE_POOLS, ImagePool
from clippy_jax.summary import summarize
from clippy_jax.train.loss import contrastive_loss
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import batch_spec, create_train_state, make_train_step
from tests.helpers import REPO

TEMPERATURE = 0.3
TOWER_PARAMS = {"image_tower", "image_projection", "text_tower", "text_projection", "logit_scale"}


def _demo_config(**model_overrides) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("size=tiny")
    config.model.update(model_overrides)
    return config


def _batch(config: ml_collections.ConfigDict, size: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, (size, config.data.max_text_length)).astype(np.int32)
    tokens[:, 6:] = 0
    image = rng.normal(size=(size, config.data.image_size, config.data.image_size, 3)).astype(np.float32)
    return dict(image=image, tokens=tokens)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(name: str, tokens: np.ndarray, cls: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The formulas of appendix A.3 (and the plain heads) in float64 numpy; tokens [B, N, D], cls [B, D]."""
    if name == "max":
        return tokens.max(axis=1)
    if name == "max_with_cls":
        return np.concatenate([cls[:, None], tokens], axis=1).max(axis=1)
    if name == "avg":
        return tokens.mean(axis=1)
    if name == "cls":
        return cls
    if name == "wmp":  # per channel, softmax over locations of value / temperature weights the values
        return (_softmax(tokens / TEMPERATURE, axis=1) * tokens).sum(axis=1)
    if name == "tsp":  # per (image, text), softmax over locations of cosine / temperature weights the locations
        cosine = np.einsum("bne,te->btn", _unit(tokens), queries)
        return np.einsum("btn,bne->bte", _softmax(cosine / TEMPERATURE, axis=-1), tokens)
    raise AssertionError(f"no reference for {name}")


@pytest.mark.parametrize("name", sorted(IMAGE_POOLS))
def test_each_head_equals_its_float64_reference(name):
    rng = np.random.default_rng(3)
    tokens, cls = rng.normal(size=(2, 7, 5)), rng.normal(size=(2, 5))
    queries = _unit(rng.normal(size=(3, 5)))
    head = IMAGE_POOLS[name](temperature=TEMPERATURE, parent=None)
    ours = jax.jit(head.apply)({}, *(jnp.asarray(x, jnp.float32) for x in (tokens, cls, queries)))
    expected = _reference(name, tokens, cls, queries)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(np.asarray(ours, np.float64), expected, atol=1e-5)


def test_each_head_declares_what_the_paper_says():
    """TSP pools the joint-space embeddings per text (appendix A.3); CLS and the released checkpoint's
    max over tokens and CLS read the CLS token; the others pool patch tokens alone."""
    declared = {name: (head.needs_cls, head.text_conditioned, head.pools_joint_space)
                for name, head in IMAGE_POOLS.items()}
    assert declared == {
        "max": (False, False, False), "max_with_cls": (True, False, False), "avg": (False, False, False),
        "cls": (True, False, False), "wmp": (False, False, False), "tsp": (False, True, True),
    }


@pytest.mark.parametrize("name", sorted(IMAGE_POOLS))
def test_the_shipped_heads_add_no_parameters(name):
    """Checkpoints written before heads became modules keep their parameter tree."""
    config = _demo_config(image_pool=name)
    model = build_model(config.model, vocab_size=64)
    params = jax.eval_shape(model.init, jax.random.key(0), _batch(config))["params"]
    assert set(params) == TOWER_PARAMS


@pytest.mark.parametrize("name", [name for name, head in IMAGE_POOLS.items() if head.needs_cls])
def test_a_head_reading_cls_is_refused_without_a_cls_token(name):
    config = _demo_config(image_pool=name)
    config.model.image.use_cls_token = False
    with pytest.raises(config_checks.ConfigError, match=rf"config.model.image_pool='{name}' reads the CLS token, "
                       r"which config.model.image.use_cls_token=False removes; set"):
        config_checks.validate(config, num_devices=1)
    model = build_model(config.model, vocab_size=64)
    with pytest.raises(ValueError, match=rf"model.image_pool='{name}' reads the CLS token"):
        jax.eval_shape(model.init, jax.random.key(0), _batch(config))


class LearnedProbePool(ImagePool):
    """Attention pooling with one learned query (big_vision's MAP head with one head and without its
    MLP): a softmax over locations of <token, probe> / sqrt(D) weights the tokens. [B, N, D] -> [B, D]."""

    @nn.compact
    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        width = tokens.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",))
        probe = self.param("probe", init, (width,), self.param_dtype)
        weights = jax.nn.softmax(jnp.einsum("bnd,d->bn", tokens, probe) / np.sqrt(width), axis=-1)
        return jnp.einsum("bn,bnd->bd", weights, tokens)


def test_a_new_head_with_a_learned_parameter_needs_only_its_registration(monkeypatch):
    """Registering the class is the only change: the config checks, the model, the train step, zero-shot
    evaluation and the summary take it as it is, and its parameter learns."""
    monkeypatch.setitem(IMAGE_POOLS, "probe", LearnedProbePool)
    config = _demo_config(image_pool="probe")
    config_checks.validate(config, num_devices=1)
    model = build_model(config.model, vocab_size=64)
    batch = _batch(config)
    boxed = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    assert set(boxed) == TOWER_PARAMS | {"image_pool_head"}
    assert boxed["image_pool_head"]["probe"].names == ("embed",)
    params = nn.unbox(boxed)
    out = jax.jit(model.apply)({"params": params}, batch)

    # The head pools the tower's tokens before the projection: the float64 reference on the same tokens.
    tokens = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.image_tower(x)[0]))(
        params, batch["image"])
    tokens, probe = np.asarray(tokens, np.float64), np.asarray(params["image_pool_head"]["probe"], np.float64)
    weights = _softmax(tokens @ probe / np.sqrt(tokens.shape[-1]), axis=-1)  # [B, N]
    assert weights.max() > 2 / tokens.shape[1]  # not a plain average
    pooled = np.einsum("bn,bnd->bd", weights, tokens)
    expected = _unit(pooled @ np.asarray(params["image_projection"]["kernel"], np.float64))
    np.testing.assert_allclose(np.asarray(out["image_emb"], np.float64), expected, atol=1e-5)

    def loss(p):
        o = model.apply({"params": p}, batch)
        return contrastive_loss(o["image_emb"], o["text_emb"], o["logit_scale"], config.train.max_logit_scale)[0]

    probe_grad = jax.jit(jax.grad(loss))(params)["image_pool_head"]["probe"]
    assert np.isfinite(probe_grad).all() and np.abs(probe_grad).max() > 1e-6

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), jax.devices()[:1])
    tx, schedule = make_optimizer(config.optim, total_steps=4)
    state, shardings = create_train_state(model, tx, batch_spec(batch, 1), mesh, seed=0)
    step = make_train_step(model, tx, schedule, shardings, mesh, config.train.max_logit_scale)
    before = np.asarray(state.params["image_pool_head"]["probe"])
    assert config.optim.warmup_steps == 0  # the first step's learning rate is not zero
    with jax.set_mesh(mesh):
        state, metrics = step(state, sharding.global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert np.abs(np.asarray(state.params["image_pool_head"]["probe"]) - before).max() > 0

    label_emb = jnp.asarray(_unit(np.random.default_rng(1).normal(size=(3, config.model.embed_dim))), jnp.float32)
    logits, _ = zero_shot.encode_image(model, params, batch["image"], label_emb)
    np.testing.assert_allclose(np.asarray(logits, np.float64), expected @ np.asarray(label_emb, np.float64).T,
                               atol=1e-5)

    monkeypatch.setattr("clippy_jax.summary._gflops", lambda *args: 0.0)  # counts only
    assert summarize(config, vocab_size=64)["parameters"]["image_pool_head"] == probe.size
