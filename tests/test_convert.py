"""`python -m clippy_jax.convert` for every kind, the orbax output that `load_pretrained` reads, the
merge into an initialised model, and the errors that name missing, unexpected and mis-shaped keys."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorstore as ts
import timm
import torch
from flax import serialization, traverse_util
from safetensors.numpy import save_file
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

from clippy_jax.convert import CheckpointMismatchError, load_pretrained, merge_pretrained
from clippy_jax.convert.__main__ import main
from clippy_jax.convert.common import unflatten
from clippy_jax.convert.t5 import convert_hf_t5, import_t5x, kwargs_from_hf_config
from clippy_jax.convert.vit import convert_vit
from clippy_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vit_state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _t5_config(**overrides) -> T5Config:
    return T5Config(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2, num_decoder_layers=1,
                    **overrides)


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _assert_same(a: dict, b: dict) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def _convert(tmp_path, kind: str, source, *extra: str) -> tuple[dict, dict]:
    out = str(tmp_path / f"converted_{kind}")
    assert main([f"--from={kind}", f"--input={source}", f"--output={out}", *extra]) == 0
    return load_pretrained(out)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_round_trip_and_merge(vit_state, tmp_path, suffix):
    path = str(tmp_path / f"vit{suffix}")
    if suffix == ".safetensors":
        save_file(vit_state, path)
    else:
        torch.save({"model": {k: torch.from_numpy(v) for k, v in vit_state.items()}}, path)
    params, config = _convert(tmp_path, "timm_vit", path, "--image-depth=2")
    _assert_same(params, unflatten(convert_vit(vit_state).params))
    assert config["image"]["width"] == 192 and config["image"]["depth"] == 2
    assert list(params) == ["image_tower"]  # the classifier head is dropped

    model = build_model(ml_collections.ConfigDict(dict(
        image=config["image"], text=dict(size="tiny", vocab_size=32), image_pool="max", text_pool="mean",
        pool_temperature=0.1, project_image=True, project_text=True, embed_dim=16, temperature_init=0.07,
        dtype="float32", param_dtype="float32",
    )))
    batch = dict(image=jnp.zeros((1, 224, 224, 3)), tokens=jnp.ones((1, 4), jnp.int32))
    initial = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    merged = merge_pretrained(initial, params)
    _assert_same(merged["image_tower"], params["image_tower"])
    _assert_same(merged["text_tower"], initial["text_tower"])


def test_importer_names_missing_unexpected_and_misshaped_keys(vit_state, tmp_path):
    broken = dict(vit_state)
    del broken["blocks.0.attn.qkv.weight"]
    broken["blocks.1.mlp.fc1.bias"] = np.zeros(7, np.float32)
    broken["blocks.0.attn.extra_scale"] = np.ones(3, np.float32)
    path = str(tmp_path / "broken.safetensors")
    save_file(broken, path)
    with pytest.raises(CheckpointMismatchError) as error:
        main(["--from=timm_vit", f"--input={path}", f"--output={tmp_path / 'out'}", "--image-depth=2"])
    message = str(error.value)
    for name in ("image_tower/encoderblock_0/attention/query/kernel", "blocks.1.mlp.fc1.bias",
                 "blocks.0.attn.extra_scale", "--allow-partial"):
        assert name in message
    assert not os.path.exists(tmp_path / "out")
    params, _ = _convert(tmp_path, "timm_vit", path, "--allow-partial", "--image-depth=2")
    flat = _flat(params)
    assert "image_tower/encoderblock_0/attention/query/kernel" not in flat
    assert "image_tower/encoderblock_0/attention/query/bias" in flat


def test_merge_refuses_partial_and_misshaped_loads(vit_state):
    pretrained = unflatten(convert_vit(vit_state).params)
    model = build_model(ml_collections.ConfigDict(dict(
        image=dict(variant="Ti/16", depth=2, posemb_grid=(7, 7)), text=dict(size="tiny", vocab_size=32),
        image_pool="max", text_pool="mean", pool_temperature=0.1, project_image=True, project_text=True,
        embed_dim=16, temperature_init=0.07, dtype="float32",
        param_dtype="float32",
    )))
    batch = dict(image=jnp.zeros((1, 112, 112, 3)), tokens=jnp.ones((1, 4), jnp.int32))
    initial = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"]))
    with pytest.raises(CheckpointMismatchError, match=r"image_tower/pos_embedding has shape \(1, 196, 192\)"):
        merge_pretrained(initial, pretrained)
    merged = merge_pretrained(initial, pretrained, strict=False)
    np.testing.assert_array_equal(merged["image_tower"]["pos_embedding"], initial["image_tower"]["pos_embedding"])
    _assert_same(merged["image_tower"]["encoderblock_1"], pretrained["image_tower"]["encoderblock_1"])

    partial = jax.tree.map(lambda x: x, pretrained)
    del partial["image_tower"]["encoderblock_1"]["mlp"]
    partial["image_tower"]["pos_embedding"] = initial["image_tower"]["pos_embedding"]
    with pytest.raises(CheckpointMismatchError, match="image_tower/encoderblock_1/mlp/wi/kernel"):
        merge_pretrained(initial, partial)

    # Sharded parameters keep their sharding.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "data"))
    sharded = dict(initial, image_tower=dict(initial["image_tower"], cls=jax.device_put(
        initial["image_tower"]["cls"], sharding)))
    merged = merge_pretrained(sharded, {"image_tower": {**partial["image_tower"], "encoderblock_1": pretrained[
        "image_tower"]["encoderblock_1"]}})
    assert merged["image_tower"]["cls"].sharding == sharding
    np.testing.assert_array_equal(merged["image_tower"]["cls"], pretrained["image_tower"]["cls"])


def _save_sentence_t5(folder, model: T5EncoderModel, dense: np.ndarray) -> None:
    model.save_pretrained(folder)
    os.makedirs(os.path.join(folder, "1_Pooling"))
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump(dict(word_embedding_dimension=64, pooling_mode_mean_tokens=True, pooling_mode_max_tokens=False,
                       pooling_mode_cls_token=False), f)
    os.makedirs(os.path.join(folder, "2_Dense"))
    with open(os.path.join(folder, "2_Dense", "config.json"), "w") as f:
        json.dump(dict(in_features=64, out_features=dense.shape[0], bias=False,
                       activation_function="torch.nn.modules.linear.Identity"), f)
    save_file({"linear.weight": dense}, os.path.join(folder, "2_Dense", "model.safetensors"))


def test_hf_t5_folders(tmp_path):
    torch.manual_seed(1)
    encoder = T5EncoderModel(_t5_config(feed_forward_proj="relu"))
    dense = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    folder = str(tmp_path / "sentence-t5")
    _save_sentence_t5(folder, encoder, dense)
    params, config = _convert(tmp_path, "hf_t5", folder)
    expected = unflatten(convert_hf_t5({k: v.numpy() for k, v in encoder.state_dict().items()},
                                       kwargs_from_hf_config(encoder.config.to_dict())).params)
    _assert_same(params["text_tower"], expected["text_tower"])
    np.testing.assert_array_equal(params["text_projection"]["kernel"], dense.T)
    assert (config["text_pool"], config["embed_dim"], config["project_text"]) == ("mean", 32, True)
    assert config["text"]["activations"] == ["relu"] and config["text"]["depth"] == 2

    # A full T5.1.1 encoder-decoder checkpoint (pytorch_model.bin): the decoder and LM head are dropped.
    full = T5ForConditionalGeneration(_t5_config(feed_forward_proj="gated-gelu"))
    folder = str(tmp_path / "t5-v1_1")
    full.config.save_pretrained(folder)
    torch.save(full.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    params, config = _convert(tmp_path, "hf_t5", folder)
    assert config["text"]["activations"] == ["gelu_tanh", "linear"] and list(params) == ["text_tower"]
    np.testing.assert_array_equal(params["text_tower"]["encoder"]["layers_1"]["mlp"]["wi_1"]["kernel"],
                                  full.encoder.block[1].layer[1].DenseReluDense.wi_1.weight.detach().numpy().T)


def _t5x_tree(model: T5EncoderModel) -> dict:
    """t5x's parameter tree (2-D attention kernels) of an HF T5 encoder."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tree = {"token_embedder/embedding": sd["shared.weight"],
            "encoder/relpos_bias/rel_embedding": sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
                                                    ".weight"].T,
            "encoder/encoder_norm/scale": sd["encoder.final_layer_norm.weight"],
            "decoder/logits_dense/kernel": np.zeros((64, 128), np.float32)}
    for i in range(model.config.num_layers):
        hf, ours = f"encoder.block.{i}.layer.", f"encoder/layers_{i}/"
        for s, t in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            tree[f"{ours}attention/{t}/kernel"] = sd[f"{hf}0.SelfAttention.{s}.weight"].T
        for name in ("wi_0", "wi_1", "wo"):
            tree[f"{ours}mlp/{name}/kernel"] = sd[f"{hf}1.DenseReluDense.{name}.weight"].T
        tree[f"{ours}pre_attention_layer_norm/scale"] = sd[f"{hf}0.layer_norm.weight"]
        tree[f"{ours}pre_mlp_layer_norm/scale"] = sd[f"{hf}1.layer_norm.weight"]
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tree.items()})


def _write_legacy_t5x(directory: str, tree: dict) -> None:
    """t5x's msgpack + tensorstore layout: 2-D kernels as zarr arrays referenced by relative paths."""
    os.makedirs(directory)
    flat = traverse_util.flatten_dict(tree)
    for key, value in flat.items():
        if value.ndim == 2 and key[-1] == "kernel":
            name = "target." + ".".join(key)
            spec = dict(driver="zarr", kvstore=dict(driver="file", path=name), metadata=dict(
                shape=list(value.shape), chunks=list(value.shape), dtype="<f4", compressor=dict(id="gzip")))
            absolute = json.loads(json.dumps(spec))
            absolute["kvstore"]["path"] = os.path.join(directory, name)
            ts.open(absolute, create=True).result().write(value).result()
            flat[key] = spec
    state = {"version": 3, "optimizer": {"target": traverse_util.unflatten_dict(flat), "state": {"step": np.int32(7)}}}
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(state))


def test_t5x_checkpoints_read_without_t5x(tmp_path):
    torch.manual_seed(2)
    model = T5EncoderModel(_t5_config(feed_forward_proj="gated-gelu"))
    expected = convert_hf_t5({k: v.numpy() for k, v in model.state_dict().items()},
                             kwargs_from_hf_config(model.config.to_dict()))
    legacy = str(tmp_path / "checkpoint_1000")
    _write_legacy_t5x(legacy, _t5x_tree(model))
    params, config = _convert(tmp_path, "t5x", legacy)
    _assert_same(params, unflatten(expected.params))
    assert config["text"]["num_heads"] == 4 and config["text"]["activations"] == ["gelu_tanh", "linear"]

    import orbax.checkpoint as ocp

    orbax_dir = str(tmp_path / "orbax_checkpoint")
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(orbax_dir, {"target": _t5x_tree(model)})
    converted = import_t5x(orbax_dir)
    assert not converted.report, converted.report.describe()
    _assert_same(unflatten(converted.params), unflatten(expected.params))


def test_open_clip_clippy_without_logit_scale_is_refused(tmp_path, vit_state):
    encoder = T5EncoderModel(_t5_config(feed_forward_proj="relu"))
    state = {**{f"visual.trunk.{k}": v for k, v in vit_state.items() if not k.startswith("head.")},
             **{f"text.transformer.{k}": v.numpy() for k, v in encoder.encoder.state_dict().items()},
             "text.proj.weight": np.zeros((192, 64), np.float32)}
    path = str(tmp_path / "clippy.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointMismatchError, match="missing .*: logit_scale"):
        main(["--from=open_clip_clippy", f"--input={path}", f"--output={tmp_path / 'out'}", "--image-depth=2"])
    save_file({**state, "logit_scale": np.array(np.log(1 / 0.07), np.float32)}, path)
    params, config = _convert(tmp_path, "open_clip_clippy", path, "--image-pool=max", "--image-depth=2")
    assert config["image_pool"] == "max" and not config["project_image"] and config["project_text"]
    assert sorted(params) == ["image_tower", "logit_scale", "text_projection", "text_tower"]


def test_safetensors_need_no_torch_and_pickles_say_how_to_get_it(vit_state, tmp_path):
    save_file(vit_state, str(tmp_path / "vit.safetensors"))
    (tmp_path / "vit.pth").write_bytes(b"not read")
    script = f"""
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is not installed")

sys.meta_path.insert(0, NoTorch())
from clippy_jax.convert.__main__ import main
main(["--from=timm_vit", "--input={tmp_path / 'vit.safetensors'}", "--output={tmp_path / 'out'}", "--image-depth=2"])
try:
    main(["--from=dino", "--input={tmp_path / 'vit.pth'}", "--output={tmp_path / 'out2'}"])
except ImportError as e:
    print("IMPORT ERROR:", e)
"""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stdout and "torch" not in result.stderr
    assert "IMPORT ERROR: Reading the PyTorch pickle" in result.stdout and "pip install torch" in result.stdout
