"""T5 encoder weights -> `text_tower` parameters, from transformers (HF) folders, sentence-T5 and
native t5x checkpoints.

HF layout: `shared.weight` (or `encoder.embed_tokens.weight`), `encoder.block.N.layer.0.SelfAttention.
{q,k,v,o}.weight` (block 0 also `relative_attention_bias.weight`), `encoder.block.N.layer.0.layer_norm`,
`encoder.block.N.layer.1.DenseReluDense.{wi | wi_0,wi_1},wo}.weight`, `encoder.block.N.layer.1.layer_norm`,
`encoder.final_layer_norm.weight`; the `encoder.` prefix is optional (open_clip keeps the bare T5Stack).
The decoder and LM head of full T5 checkpoints are dropped. t5x's tree is ours with 2-D attention
kernels ([embed, heads * kv] and [heads * kv, embed]).
"""

import glob
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from clippy_jax.convert.common import (
    CheckpointMismatchError,
    Converted,
    ConvertError,
    Rule,
    expected_shapes,
    map_state,
    read_json,
    read_state_dict,
    same,
    transpose,
)
from clippy_jax.models.t5 import T5Encoder

PREFIX = "text_tower/"
HF_IGNORED = (r"decoder\..*", r"lm_head\..*")
T5X_IGNORED = (r"decoder/.*",)
# HF `feed_forward_proj` activation names -> ours.
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_t5_rules(width: int, num_heads: int, head_dim: int) -> list[Rule]:
    """The HF -> ours mapping table."""
    block, out = r"(?:encoder\.)?block\.(\d+)\.layer\.", PREFIX + r"encoder/layers_\1/"
    qkv = (("q", "query"), ("k", "key"), ("v", "value"))
    return [
        (r"shared\.weight|(?:encoder\.)?embed_tokens\.weight", PREFIX + "token_embedder/embedding", same),
        (r"(?:encoder\.)?block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         PREFIX + "encoder/relpos_bias/rel_embedding", transpose),  # [buckets, H] -> [H, buckets]
        *[(block + rf"0\.SelfAttention\.{s}\.weight", out + f"attention/{t}/kernel",
           lambda w: w.T.reshape(width, num_heads, head_dim)) for s, t in qkv],
        (block + r"0\.SelfAttention\.o\.weight", out + "attention/out/kernel",
         lambda w: w.T.reshape(num_heads, head_dim, width)),
        (block + r"0\.layer_norm\.weight", out + "pre_attention_layer_norm/scale", same),
        (block + r"1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", out + r"mlp/\2/kernel", transpose),
        (block + r"1\.layer_norm\.weight", out + "pre_mlp_layer_norm/scale", same),
        (r"(?:encoder\.)?final_layer_norm\.weight", PREFIX + "encoder/encoder_norm/scale", same),
    ]


def t5x_rules(width: int, num_heads: int, head_dim: int) -> list[Rule]:
    """The t5x -> ours mapping table (t5x stores attention kernels flattened to 2-D)."""
    block, out = r"encoder/layers_(\d+)/", PREFIX + r"encoder/layers_\1/"
    return [
        ("token_embedder/embedding", PREFIX + "token_embedder/embedding", same),
        ("encoder/relpos_bias/rel_embedding", PREFIX + "encoder/relpos_bias/rel_embedding", same),
        (block + r"attention/(query|key|value)/kernel", out + r"attention/\2/kernel",
         lambda w: w.reshape(width, num_heads, head_dim)),
        (block + r"attention/out/kernel", out + "attention/out/kernel",
         lambda w: w.reshape(num_heads, head_dim, width)),
        (block + r"(pre_attention_layer_norm|pre_mlp_layer_norm)/scale", out + r"\2/scale", same),
        (block + r"mlp/(wi|wi_0|wi_1|wo)/kernel", out + r"mlp/\2/kernel", same),
        ("encoder/encoder_norm/scale", PREFIX + "encoder/encoder_norm/scale", same),
    ]


def kwargs_from_hf_config(config: dict) -> dict:
    """`T5Encoder` keyword arguments from a transformers `T5Config` dict (config.json)."""
    proj = config.get("feed_forward_proj", "relu")
    gated, act = proj.startswith("gated-"), proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act  # transformers' special case for T5.1.1
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"Unsupported feed_forward_proj={proj!r}; supported activations: {sorted(HF_ACTIVATIONS)}.")
    return dict(
        vocab_size=config["vocab_size"], embed_dim=config["d_model"], depth=config["num_layers"],
        num_heads=config["num_heads"], head_dim=config["d_kv"], mlp_dim=config["d_ff"],
        activations=(HF_ACTIVATIONS[act], "linear") if gated else (HF_ACTIVATIONS[act],),
        num_buckets=config.get("relative_attention_num_buckets", 32),
        max_distance=config.get("relative_attention_max_distance", 128),
        epsilon=config.get("layer_norm_epsilon", 1e-6),
    )


def _kwargs_from_shapes(embedding: np.ndarray, rel_embedding: np.ndarray, inner: int, mlp_dim: int, depth: int,
                        gated: bool) -> dict:
    """Keyword arguments inferred from weights alone: gated MLPs are taken as T5.1.1 (gated GELU),
    others as T5 v1.0 (ReLU); the bucket count comes from the table, the maximum distance is T5's 128."""
    num_heads, num_buckets = rel_embedding.shape
    return dict(
        vocab_size=int(embedding.shape[0]), embed_dim=int(embedding.shape[1]), depth=depth,
        num_heads=int(num_heads), head_dim=int(inner // num_heads), mlp_dim=int(mlp_dim),
        activations=("gelu_tanh", "linear") if gated else ("relu",), num_buckets=int(num_buckets),
    )


def _depth(keys, pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in keys if (m := re.match(pattern, k)))


def kwargs_from_hf_state(state: dict[str, np.ndarray]) -> dict:
    """`T5Encoder` keyword arguments inferred from HF-layout weights (no config.json, e.g. open_clip)."""
    get = {re.sub(r"^encoder\.", "", k): v for k, v in state.items()}
    embedding = get.get("shared.weight", get.get("embed_tokens.weight"))
    rel = get.get("block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if embedding is None or rel is None:
        raise KeyError("Not a T5 encoder state dict: no token embedding or relative_attention_bias in block 0.")
    gated = "block.0.layer.1.DenseReluDense.wi_0.weight" in get
    mlp = get["block.0.layer.1.DenseReluDense.wi_0.weight" if gated else "block.0.layer.1.DenseReluDense.wi.weight"]
    return _kwargs_from_shapes(embedding, rel.T, get["block.0.layer.0.SelfAttention.q.weight"].shape[0],
                               mlp.shape[0], _depth(get, r"block\.(\d+)\."), gated)


def _expected(kwargs: dict) -> dict[str, tuple[int, ...]]:
    return expected_shapes(T5Encoder(**kwargs), jnp.ones((1, 4), jnp.int32), prefix=PREFIX)


def convert_hf_t5(state: dict[str, np.ndarray], kwargs: dict) -> Converted:
    """HF-layout T5 encoder weights -> `text_tower` parameters."""
    rules = hf_t5_rules(kwargs["embed_dim"], kwargs["num_heads"], kwargs["head_dim"])
    params, report = map_state(state, rules, _expected(kwargs), HF_IGNORED)
    return Converted(params, dict(text=kwargs), report)


def _read_weights(folder: str) -> dict[str, np.ndarray]:
    """The weights of a transformers / sentence-transformers module folder (single or sharded file)."""
    for name in WEIGHT_FILES:
        index = os.path.join(folder, name + ".index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_state_dict(os.path.join(folder, shard)).items()}
        if os.path.exists(os.path.join(folder, name)):
            return read_state_dict(os.path.join(folder, name))
    raise FileNotFoundError(f"No weights in {folder}; expected one of {WEIGHT_FILES} (or a sharded index).")


# sentence-transformers module types (`modules.json`) -> the role of their folder here.
SENTENCE_TRANSFORMERS_MODULES = {"Transformer": "encoder", "T5": "encoder", "Pooling": "pooling", "Dense": "dense",
                                 "Normalize": None}


def _sentence_transformers_modules(folder: str) -> tuple[str, str | None, str | None]:
    """The (encoder, Pooling, Dense) folders of a sentence-transformers model.

    With `modules.json` (the saved layout: e.g. `0_T5EncoderModel/` or the folder itself for the
    encoder, `1_Pooling/`, `2_Dense/`, `3_Normalize/`), its module paths and types; otherwise the
    folder holds the encoder's config.json (or one `0_*` folder does) and `*_Pooling` / `*_Dense`
    folders are optional."""
    found = dict(encoder=[], pooling=[], dense=[])
    modules_json = os.path.join(folder, "modules.json")
    if os.path.exists(modules_json):
        with open(modules_json) as f:
            modules = json.load(f)  # a list of {"path", "type"}
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]
            if kind not in SENTENCE_TRANSFORMERS_MODULES:
                raise ConvertError(f"{modules_json}: unsupported module type {module['type']!r}; supported: "
                                   f"{sorted(SENTENCE_TRANSFORMERS_MODULES)}.")
            if SENTENCE_TRANSFORMERS_MODULES[kind]:
                found[SENTENCE_TRANSFORMERS_MODULES[kind]].append(os.path.join(folder, module["path"]))
    else:
        found["encoder"] = [folder] if os.path.exists(os.path.join(folder, "config.json")) else sorted(
            os.path.dirname(p) for p in glob.glob(os.path.join(folder, "0_*", "config.json")))
        found["pooling"] = sorted(glob.glob(os.path.join(folder, "*_Pooling")))
        found["dense"] = sorted(glob.glob(os.path.join(folder, "*_Dense")))
    if len(found["encoder"]) != 1:
        raise ConvertError(f"{folder}: expected one T5 encoder folder with a config.json (the folder itself or "
                                f"0_T5EncoderModel/ ...), found {found['encoder'] or 'none'}.")
    for kind in ("pooling", "dense"):
        if len(found[kind]) > 1:
            raise ConvertError(f"{folder} has several {kind} modules {found[kind]}; only one is supported.")
    return found["encoder"][0], *(found[kind][0] if found[kind] else None for kind in ("pooling", "dense"))


def import_hf_t5(folder: str) -> Converted:
    """A transformers T5 / T5.1.1 folder (config.json + weights), or a sentence-T5 model folder
    (sentence-transformers layout: `modules.json`, `0_T5EncoderModel/`, `1_Pooling/`, `2_Dense/`)
    whose mean pooling and bias-free Dense layer become `text_pool` and `text_projection`."""
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder} is not a folder; --from=hf_t5 reads a transformers model folder "
                           "(config.json and the weights) or a sentence-transformers folder.")
    encoder, pooling, dense = _sentence_transformers_modules(folder)
    config_path = os.path.join(encoder, "config.json")
    try:
        kwargs = kwargs_from_hf_config(read_json(config_path))
    except KeyError as error:
        raise ConvertError(f"{config_path} has no {error}; expected a transformers T5Config.") from None
    converted = convert_hf_t5(_read_weights(encoder), kwargs)
    if pooling is not None:
        converted.model_config["text_pool"] = _sentence_t5_pooling(pooling)
    if dense is not None:
        converted = converted.merged(_sentence_t5_dense(dense, kwargs["embed_dim"]))
    return converted


def _sentence_t5_pooling(folder: str) -> str:
    """The `text_pool` of a sentence-transformers Pooling module."""
    modes = read_json(os.path.join(folder, "config.json"))
    pools = [pool for key, pool in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_max_tokens", "max"),
                                    ("pooling_mode_cls_token", "first")) if modes.get(key)]
    if len(pools) != 1:
        raise ValueError(f"{folder}/config.json enables {pools or 'no'} pooling modes; exactly one is supported.")
    return pools[0]


def _sentence_t5_dense(folder: str, width: int) -> Converted:
    """A sentence-transformers Dense module (bias-free, linear) -> `text_projection`."""
    config = read_json(os.path.join(folder, "config.json"))
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity")
    if not activation.endswith("Identity"):
        raise CheckpointMismatchError(f"{folder} applies {activation}; only a linear (Identity) Dense is supported.")
    expected = {"text_projection/kernel": (width, config["out_features"])}
    params, report = map_state(_read_weights(folder), [(r"linear\.weight", "text_projection/kernel", transpose)],
                               expected)
    report.unexpected = [f"{os.path.basename(folder)}/{k}" for k in report.unexpected]
    return Converted(params, dict(embed_dim=config["out_features"], project_text=True), report)


def _is_tensorstore_spec(value) -> bool:
    return isinstance(value, dict) and {"driver", "kvstore"} <= set(value)


def _read_tensorstore(spec: dict, directory: str) -> np.ndarray:
    import tensorstore as ts  # noqa: PLC0415 (installed with orbax)

    spec = json.loads(json.dumps(spec))
    kvstore = spec["kvstore"]
    kvstore["path"] = os.path.join(directory, kvstore.get("path", spec.pop("path", "")))
    kvstore.pop("bucket", None)
    kvstore["driver"] = "file"  # checkpoints copied down from GCS ('gcs', 'gfile' drivers)
    return np.asarray(ts.open(spec).result().read().result())


def read_t5x(directory: str) -> dict[str, np.ndarray]:
    """Flat {'encoder/layers_0/...': array} of a t5x checkpoint directory (`checkpoint_N/`), read
    without t5x: the msgpack `checkpoint` file with its tensorstore (zarr) arrays, or an orbax save."""
    msgpack_path = os.path.join(directory, "checkpoint")
    if os.path.isfile(msgpack_path):
        with open(msgpack_path, "rb") as f:
            contents = serialization.msgpack_restore(f.read())
    else:
        import orbax.checkpoint as ocp  # noqa: PLC0415

        with ocp.PyTreeCheckpointer() as checkpointer:
            contents = checkpointer.restore(directory)
    tree = contents.get("optimizer", contents)
    tree = tree.get("target", tree)
    flat = traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, v: _is_tensorstore_spec(v))
    out = {}
    for key, value in flat.items():
        if _is_tensorstore_spec(value):
            value = _read_tensorstore(value, directory)
        elif isinstance(value, str) and value.startswith("PLACEHOLDER://"):
            zarr = dict(driver="zarr", kvstore=dict(driver="file", path=value[len("PLACEHOLDER://"):]))
            value = _read_tensorstore(zarr, directory)
        out[key] = np.asarray(value, np.float32)
    return out


def import_t5x(directory: str) -> Converted:
    """A native t5x T5 / T5.1.1 checkpoint directory (the encoder half)."""
    flat = read_t5x(directory)
    if "token_embedder/embedding" not in flat or "encoder/relpos_bias/rel_embedding" not in flat:
        raise KeyError(f"{directory} is not a t5x T5 checkpoint: keys start {sorted(flat)[:5]}.")
    gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
    kwargs = _kwargs_from_shapes(
        flat["token_embedder/embedding"], flat["encoder/relpos_bias/rel_embedding"],
        int(np.prod(flat["encoder/layers_0/attention/query/kernel"].shape[1:])),
        flat["encoder/layers_0/mlp/wi_0/kernel" if gated else "encoder/layers_0/mlp/wi/kernel"].shape[-1],
        _depth(flat, r"encoder/layers_(\d+)/"), gated,
    )
    rules = t5x_rules(kwargs["embed_dim"], kwargs["num_heads"], kwargs["head_dim"])
    params, report = map_state(flat, rules, _expected(kwargs), T5X_IGNORED)
    return Converted(params, dict(text=kwargs), report)
