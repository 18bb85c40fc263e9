"""Converted random-weight timm / DINO ViTs, transformers T5 encoders and a synthetic open_clip CLIPpy
checkpoint give the PyTorch outputs (max abs diff <= 1e-4 in float32), and the soft pooling heads
behave as appendix A.3 describes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from clippy_jax.convert.clippy import import_open_clip_clippy
from clippy_jax.convert.common import unflatten
from clippy_jax.convert.t5 import convert_hf_t5, kwargs_from_hf_config
from clippy_jax.convert.vit import convert_dino, convert_vit
from clippy_jax.data import preprocess
from clippy_jax.models import build_model
from clippy_jax.models.pooling import IMAGE_POOLS, TEXT_POOLS, weighted_max
from clippy_jax.models.resample import resample_grid
from clippy_jax.models.t5 import T5Encoder, relative_position_bucket
from clippy_jax.models.two_tower import pair_similarity
from clippy_jax.models.vit import VisionTransformer

ATOL = 1e-4
MAX_DIFFS: dict[str, float] = {}


def _close(name: str, ours, reference) -> None:
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64)).max())
    MAX_DIFFS[name] = diff
    print(f"max abs diff {name}: {diff:.2e}")
    assert diff <= ATOL, f"{name}: max abs diff {diff}"


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (timm initialises biases to 0 and norms to 1, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def _numpy_state(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()}


def _images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def _torch_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _encode(kwargs: dict, params: dict, images: np.ndarray, pools=(), patch_indices=None):
    """Our ViT: (tokens, cls, {pool name: post-pool-normalised pooled features})."""

    def run(module: VisionTransformer, x):
        tokens, cls = module(x, patch_indices=patch_indices)
        pooled = {name: module.pool_norm(IMAGE_POOLS[name](parent=None).apply({}, tokens, cls)) for name in pools}
        return tokens, cls, pooled

    return jax.jit(lambda p, x: VisionTransformer(**kwargs).apply({"params": p}, x, method=run))(params, images)


@pytest.fixture(scope="module")
def vit_b16():
    model = _perturbed(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), seed=0)
    return model, _numpy_state(model)


def test_vit_b16_matches_timm_at_224(vit_b16):
    model, state = vit_b16
    converted = convert_vit(state)
    assert not converted.report, converted.report.describe()
    kwargs = converted.model_config["image"]
    assert kwargs == dict(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12, posemb_grid=(14, 14),
                          use_cls_token=True, norm_placement="pre_pool")
    images = _images(1, 224, 224)
    tokens, cls, pooled = _encode(kwargs, unflatten(converted.params)["image_tower"], images,
                                  pools=("max", "max_with_cls", "avg", "cls"))
    with torch.no_grad():
        features = model.forward_features(_torch_images(images))  # [B, 1 + N, D] after the final norm
        _close("vit_b16_224/tokens", tokens, features[:, 1:])
        _close("vit_b16_224/cls", cls, features[:, 0])
        _close("vit_b16_224/max", pooled["max"], model.pool(features, "max"))
        _close("vit_b16_224/avg", pooled["avg"], model.pool(features, "avg"))
        _close("vit_b16_224/cls_pool", pooled["cls"], model.forward_head(features, pre_logits=True))
        _close("vit_b16_224/max_with_cls", pooled["max_with_cls"], features.amax(dim=1))


def test_dino_keyed_state_dict_converts_identically(vit_b16):
    _, state = vit_b16
    dino_head = {"head.mlp.0.weight": np.zeros((8, 768), np.float32), "head.last_layer.weight_g": np.ones((1, 8))}
    full_checkpoint = dict(
        teacher={**{f"backbone.{k}": v for k, v in state.items()}, **dino_head},
        student={f"module.backbone.{k}": v + 1 for k, v in state.items()},
        epoch=np.int64(100),
    )
    reference = convert_vit(state).params
    for contents in (full_checkpoint, {f"module.{k}": v for k, v in state.items()}):
        converted = convert_dino(contents)
        assert not converted.report, converted.report.describe()
        assert converted.params.keys() == reference.keys()
        for key, value in reference.items():
            np.testing.assert_array_equal(converted.params[key], value, err_msg=key)


@pytest.mark.parametrize("global_pool", ["token", "avg", "max"])
@pytest.mark.parametrize("size", [(448, 448), (224, 320)])
def test_vit_s16_other_sizes_and_norm_placements_match_timm(size, global_pool):
    """448 input (784 tokens) and a non-square input on a 224-trained model; timm's avg/max pooling
    puts the norm after pooling (`fc_norm`), which converts to norm_placement='post_pool'."""
    model = _perturbed(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                         global_pool=global_pool, dynamic_img_size=True), seed=1)
    converted = convert_vit(_numpy_state(model))
    assert not converted.report, converted.report.describe()
    kwargs = converted.model_config["image"]
    assert kwargs["norm_placement"] == ("pre_pool" if global_pool == "token" else "post_pool")
    pool = dict(token="cls", avg="avg", max="max")[global_pool]
    images = _images(2, *size, seed=2)
    tokens, cls, pooled = _encode(kwargs, unflatten(converted.params)["image_tower"], images, pools=(pool,))
    assert tokens.shape == (2, size[0] * size[1] // 256, 384)
    with torch.no_grad():
        features = model.forward_features(_torch_images(images))
        name = f"vit_s16_{size[0]}x{size[1]}_{global_pool}"
        _close(f"{name}/tokens", tokens, features[:, 1:])
        _close(f"{name}/cls", cls, features[:, 0])
        _close(f"{name}/pooled", pooled[pool], model.forward_head(features, pre_logits=True))


@pytest.mark.parametrize("size", [(224, 224), (224, 320)])
def test_overlapping_patches_match_timm_with_a_strided_patch_embedding(size):
    """patch_stride=8 on a ViT-S/16 equals timm's PatchEmbed with its conv stride set to 8 (appendix E's
    overlapping patches): a 27 x 27 grid at 224, 27 x 39 at 224 x 320, position embeddings resampled to it."""
    model = _perturbed(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                         global_pool="max", dynamic_img_size=True), seed=6)
    model.patch_embed.proj.stride = (8, 8)
    converted = convert_vit(_numpy_state(model))
    kwargs = dict(converted.model_config["image"], patch_stride=8)
    images = _images(2, *size, seed=7)
    tokens, cls, pooled = _encode(kwargs, unflatten(converted.params)["image_tower"], images, pools=("max",))
    assert tokens.shape == (2, 27 * ((size[1] - 16) // 8 + 1), 384)
    with torch.no_grad():
        features = model.forward_features(_torch_images(images))
        name = f"vit_s16_stride8_{size[0]}x{size[1]}"
        assert features.shape[1] == 1 + tokens.shape[1]
        _close(f"{name}/tokens", tokens, features[:, 1:])
        _close(f"{name}/cls", cls, features[:, 0])
        _close(f"{name}/pooled", pooled["max"], model.forward_head(features, pre_logits=True))
    # 196 of the overlapping patches as the input pipeline extracts them give the same tokens as
    # dropping the others after the position embeddings of the full image.
    grid = ((size[0] - 16) // 8 + 1, (size[1] - 16) // 8 + 1)
    keep = np.sort(np.random.default_rng(8).permutation(grid[0] * grid[1])[:196])[None].astype(np.int32)
    kept = preprocess.patchify(tf.constant(images[0]), 16, 8).numpy()[keep]  # [1, 196, 16 * 16 * 3]
    module, params = VisionTransformer(**kwargs), {"params": unflatten(converted.params)["image_tower"]}
    from_patches, _ = module.apply(params, patches=kept, patch_indices=keep, grid_shape=grid)
    dropped, _ = module.apply(params, images[:1], patch_indices=keep)
    np.testing.assert_allclose(from_patches, dropped, atol=1e-5)


def test_patch_dropping_gathers_after_position_embeddings():
    model = _perturbed(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                         dynamic_img_size=True), seed=3)
    converted = convert_vit(_numpy_state(model))
    kwargs, params = converted.model_config["image"], unflatten(converted.params)["image_tower"]
    images = _images(2, 448, 448, seed=4)
    keep = np.stack([np.sort(np.random.default_rng(i).permutation(784)[:157]) for i in range(2)]).astype(np.int32)
    tokens, cls, _ = _encode(kwargs, params, images, patch_indices=keep)
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(_torch_images(images)))  # [B, 1 + N, D]
        index = torch.from_numpy(keep).long()[..., None].expand(-1, -1, x.shape[-1])
        x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, index)], dim=1)
        reference = model.norm(model.blocks(x))
    _close("vit_s16_patch_drop/tokens", tokens, reference[:, 1:])
    _close("vit_s16_patch_drop/cls", cls, reference[:, 0])
    # The pre-patchified path of the input pipeline gives the same tokens.
    patches = images.reshape(2, 28, 16, 28, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 784, -1)
    kept = np.take_along_axis(patches, keep[..., None], axis=1)
    from_patches, _ = VisionTransformer(**kwargs).apply({"params": params}, patches=kept, patch_indices=keep,
                                                        grid_shape=(28, 28))
    np.testing.assert_allclose(from_patches, tokens, atol=1e-5)


def test_position_embedding_resampling_matches_timm():
    posemb = np.random.default_rng(5).normal(size=(1, 1 + 14 * 14, 16)).astype(np.float32)
    for grid in [(28, 28), (14, 20), (7, 7), (10, 23), (14, 14)]:
        reference = resample_abs_pos_embed(torch.from_numpy(posemb), list(grid), (14, 14), num_prefix_tokens=1)
        ours = resample_grid(jnp.asarray(posemb[:, 1:]), (14, 14), grid)
        assert ours.shape == (1, grid[0] * grid[1], 16)
        np.testing.assert_allclose(ours, reference[:, 1:].numpy(), atol=1e-5, err_msg=str(grid))


def test_relative_position_buckets_match_transformers():
    offsets = torch.arange(-700, 700)
    reference = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_bucket(offsets.numpy()), reference.numpy())


T5_CONFIGS = {
    "t5_1_0_small": dict(d_model=512, d_kv=64, d_ff=2048, num_heads=8, feed_forward_proj="relu"),
    "t5_1_1_small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, feed_forward_proj="gated-gelu"),
}


def _hf_t5(name: str, num_layers: int = 2, vocab_size: int = 1000) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, num_layers=num_layers, dropout_rate=0.0, **T5_CONFIGS[name])
    torch.manual_seed(6)
    return _perturbed(T5EncoderModel(config), seed=7)


def _token_batch(vocab_size: int, lengths=(48, 30, 1), seed: int = 8) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(3, vocab_size, (len(lengths), max(lengths))).astype(np.int32)
    for row, length in enumerate(lengths):
        tokens[row, length - 1] = 1  # EOS
        tokens[row, length:] = 0
    return tokens


@pytest.mark.parametrize("name", sorted(T5_CONFIGS))
def test_t5_encoder_matches_transformers(name):
    model = _hf_t5(name)
    kwargs = kwargs_from_hf_config(model.config.to_dict())
    converted = convert_hf_t5(_numpy_state(model), kwargs)
    assert not converted.report, converted.report.describe()
    tokens = _token_batch(model.config.vocab_size)
    mask = tokens > 0

    def run(module: T5Encoder, x):
        features = module(x)
        return features, {k: fn(features, x > 0) for k, fn in TEXT_POOLS.items()}

    params = unflatten(converted.params)["text_tower"]
    features, pooled = jax.jit(lambda p, x: T5Encoder(**kwargs).apply({"params": p}, x, method=run))(params, tokens)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long())
        hidden = hidden.last_hidden_state
        weights = torch.from_numpy(mask).float()[..., None]
        _close(f"{name}/tokens", np.asarray(features)[mask], hidden.numpy()[mask])
        _close(f"{name}/mean", pooled["mean"], (hidden * weights).sum(1) / weights.sum(1))
        _close(f"{name}/max", pooled["max"], hidden.masked_fill(weights == 0, -torch.inf).amax(1))
        _close(f"{name}/first", pooled["first"], hidden[:, 0])


@pytest.fixture(scope="module")
def clippy_parts():
    """A small CLIPpy in both open_clip text layouts: a ViT-S/16 trunk and a 2-layer T5 v1.0 encoder."""
    vit = _perturbed(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                       dynamic_img_size=True), seed=9)
    t5 = _hf_t5("t5_1_0_small")
    proj = _perturbed(torch.nn.Linear(512, 384, bias=False), seed=10)
    return vit, t5, proj


@pytest.mark.parametrize("layout", ["sentence_transformers", "open_clip_hf"])
def test_open_clip_clippy_matches_pytorch(clippy_parts, layout, tmp_path):
    vit, t5, proj = clippy_parts
    if layout == "sentence_transformers":
        text = {**_numpy_state(t5, "text.0.auto_model."), "text.2.linear.weight": proj.weight.detach().numpy()}
    else:
        text = {**_numpy_state(t5.encoder, "text.transformer."), "text.proj.weight": proj.weight.detach().numpy()}
    checkpoint = {"state_dict": {f"module.{k}": torch.from_numpy(np.array(v)) for k, v in {
        **_numpy_state(vit, "visual.trunk."), **text, "logit_scale": np.array(np.log(1 / 0.05), np.float32),
    }.items()}, "epoch": 5}
    path = str(tmp_path / "clippy.pt")
    torch.save(checkpoint, path)
    converted = import_open_clip_clippy(path)
    assert not converted.report, converted.report.describe()
    config = converted.model_config
    assert (config["image_pool"], config["embed_dim"], config["project_image"], config["project_text"]) == (
        "max_with_cls", 384, False, True)
    np.testing.assert_allclose(config["temperature_init"], 0.05, rtol=1e-5)
    model = build_model(ml_collections.ConfigDict(config))
    params = unflatten(converted.params)
    tokens = _token_batch(t5.config.vocab_size)
    text_emb = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))(params, tokens)
    with torch.no_grad():
        mask = torch.from_numpy(tokens > 0).float()
        hidden = t5(input_ids=torch.from_numpy(tokens).long(), attention_mask=mask.long()).last_hidden_state
        reference = F.normalize(proj((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)), dim=-1)
    _close(f"clippy_{layout}/text_emb", text_emb, reference)
    for size in (224, 448):
        images = _images(2, size, size, seed=size)
        pooled, dense = jax.jit(lambda p, x: model.apply({"params": p}, x, dense=True, method=model.encode_image))(
            params, images)
        with torch.no_grad():
            features = vit.forward_features(_torch_images(images))
            _close(f"clippy_{layout}_{size}/image_emb", pooled, F.normalize(features.amax(dim=1), dim=-1))
            _close(f"clippy_{layout}_{size}/dense", dense, F.normalize(features[:, 1:], dim=-1))


def _small_two_tower(image_pool: str, remat: str = "none", **overrides):
    config = dict(
        image=dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, posemb_grid=(4, 4), remat=remat),
        text=dict(vocab_size=64, embed_dim=32, depth=1, num_heads=2, head_dim=16, mlp_dim=64, remat=remat),
        image_pool=image_pool, text_pool="mean", pool_temperature=0.1, project_image=True, project_text=True,
        embed_dim=16, temperature_init=0.07, dtype="float32",
        param_dtype="float32",
    )
    batch = dict(image=_images(4, 32, 32), tokens=_token_batch(64, lengths=(5, 7, 3, 2)))
    return build_model(ml_collections.ConfigDict({**config, **overrides})), batch


def test_weighted_max_pool_interpolates_between_max_and_mean():
    tokens = jnp.asarray(np.random.default_rng(11).normal(size=(2, 9, 5)), jnp.float32)
    np.testing.assert_allclose(weighted_max(tokens, 1e-4), tokens.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(weighted_max(tokens, 1e5), tokens.mean(axis=1), atol=1e-4)


def test_text_similarity_pool_gives_pair_embeddings_and_a_contrastive_loss():
    model, batch = _small_two_tower("tsp", pool_temperature=1e5)
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    out = jax.jit(model.apply)({"params": params}, batch)
    assert out["image_emb"].shape == (4, 4, 16) and out["text_emb"].shape == (4, 16)
    # A very high temperature makes TSP an average of the per-location embeddings, the same for every text.
    projected = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.image_projection(
        m.image_tower(x)[0])))(params, batch["image"]).mean(axis=1)
    expected = projected / np.linalg.norm(projected, axis=-1, keepdims=True)
    np.testing.assert_allclose(out["image_emb"], np.broadcast_to(expected[:, None], (4, 4, 16)), atol=1e-5)
    assert pair_similarity(out["image_emb"], out["text_emb"]).shape == (4, 4)

    def loss(p):
        o = model.apply({"params": p}, batch)
        logits = pair_similarity(o["image_emb"], o["text_emb"]) * jnp.exp(o["logit_scale"])
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, 1)) + jnp.diagonal(jax.nn.log_softmax(logits, 0)))

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="pass `text_emb`"):
        jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(params, batch["image"])


def test_every_parameter_has_logical_axes_and_bf16_compute_keeps_f32_params():
    model, batch = _small_two_tower("wmp", remat="dots", dtype="bfloat16")
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), batch)["params"])
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned) and x.shape != ()]  # logit_scale is a scalar
    assert not unnamed
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda p: model.apply({"params": p}, batch))(params)
    assert out["image_emb"].dtype == jnp.float32 and np.isfinite(out["image_emb"]).all()
