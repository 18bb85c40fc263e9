"""A sentence-T5-base in the sentence-transformers on-disk layout (random weights) converts and
initialises the text tower of configs/cc12m.py (appendix Tab. 9's sentence-T5 initialisation)."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import T5Config, T5EncoderModel

from clippy_jax.convert import CheckpointMismatchError
from clippy_jax.convert.__main__ import main
from clippy_jax.convert.common import CONFIG_FILE
from clippy_jax.evaluate.loading import load_config_file
from clippy_jax.models import build_model, tower_kwargs
from clippy_jax.train.loop import initialize_from_pretrained
from tests.helpers import REPO

# sentence-transformers/sentence-t5-base: a T5 v1.0 base encoder, mean pooling, a bias-free 768 -> 768 Dense,
# then normalisation.
MODULES = [
    {"idx": 0, "name": "0", "path": "0_T5EncoderModel", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
]


@pytest.fixture(scope="module")
def sentence_t5(tmp_path_factory):
    """(converted directory, HF encoder state dict, Dense weight [out, in]) of a random sentence-T5-base."""
    folder = tmp_path_factory.mktemp("sentence-t5-base")
    torch.manual_seed(0)
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=12,
                      feed_forward_proj="relu")
    encoder = T5EncoderModel(config)
    encoder.save_pretrained(folder / "0_T5EncoderModel")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps(dict(
        word_embedding_dimension=768, pooling_mode_cls_token=False, pooling_mode_mean_tokens=True,
        pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False)))
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense/config.json").write_text(json.dumps(dict(
        in_features=768, out_features=768, bias=False, activation_function="torch.nn.modules.linear.Identity")))
    dense = np.random.default_rng(0).normal(size=(768, 768)).astype(np.float32)
    save_file({"linear.weight": dense}, str(folder / "2_Dense/model.safetensors"))
    (folder / "3_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(MODULES))
    out = str(tmp_path_factory.mktemp("converted") / "st5")
    assert main(["--from=hf_t5", f"--input={folder}", f"--output={out}"]) == 0
    state = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
    return out, state, dense


def _cc12m(text_init: str, **model) -> tuple[ml_collections.ConfigDict, dict]:
    """configs/cc12m.py with the converted text initialisation, and its abstract initial parameters."""
    config = load_config_file(os.path.join(REPO, "configs/cc12m.py"))
    config.init.update(image="random", text=text_init)
    config.model.update(model)
    model = build_model(config.model)
    batch = dict(image=jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32),
                 tokens=jax.ShapeDtypeStruct((1, 8), np.int32))
    return config, jax.eval_shape(lambda b: model.init(jax.random.key(0), b)["params"], batch)


def test_sentence_t5_initialises_the_cc12m_text_tower(sentence_t5):
    out, state, dense = sentence_t5
    with open(os.path.join(out, CONFIG_FILE)) as f:
        converted = json.load(f)["model"]
    config, params = _cc12m(out, embed_dim=768)  # the sentence-T5 Dense is the text projection
    assert (converted["text_pool"], converted["embed_dim"]) == (config.model.text_pool, 768)
    _, text_tower = tower_kwargs(config.model.image, config.model.text)  # the T5-base preset, expanded
    assert {k: converted["text"][k] for k in ("embed_dim", "depth", "num_heads", "head_dim", "mlp_dim")} == {
        k: text_tower[k] for k in ("embed_dim", "depth", "num_heads", "head_dim", "mlp_dim")}
    merged = initialize_from_pretrained(params, config.init)
    text = merged["text_tower"]
    np.testing.assert_array_equal(text["token_embedder"]["embedding"], state["shared.weight"])
    for i in (0, 11):
        layer, hf = text["encoder"][f"layers_{i}"], f"encoder.block.{i}.layer."
        np.testing.assert_array_equal(layer["attention"]["query"]["kernel"].reshape(768, 768),
                                      state[hf + "0.SelfAttention.q.weight"].T)
        np.testing.assert_array_equal(layer["attention"]["out"]["kernel"].reshape(768, 768),
                                      state[hf + "0.SelfAttention.o.weight"].T)
        np.testing.assert_array_equal(layer["mlp"]["wi"]["kernel"], state[hf + "1.DenseReluDense.wi.weight"].T)
        np.testing.assert_array_equal(layer["pre_mlp_layer_norm"]["scale"], state[hf + "1.layer_norm.weight"])
    np.testing.assert_array_equal(text["encoder"]["relpos_bias"]["rel_embedding"],
                                  state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T)
    np.testing.assert_array_equal(text["encoder"]["encoder_norm"]["scale"], state["encoder.final_layer_norm.weight"])
    np.testing.assert_array_equal(merged["text_projection"]["kernel"], dense.T)
    assert isinstance(merged["image_tower"]["cls"], jax.ShapeDtypeStruct)  # the image tower stays as initialised


def test_paper_embed_dim_refuses_the_768_dense_naming_it(sentence_t5):
    config, params = _cc12m(sentence_t5[0])  # embed_dim=512: the Dense does not fit the text projection
    with pytest.raises(CheckpointMismatchError, match="text_projection/kernel"):
        initialize_from_pretrained(params, config.init)
