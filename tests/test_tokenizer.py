"""The SentencePiece tokenizer follows T5's conventions and gives the ids of transformers' T5Tokenizer
on the same `.model` file; the in-graph `tf_encode` equals `encode`.

transformers 5 has no sentencepiece-based ("slow") T5 tokenizer any more: its `T5Tokenizer` is the
tokenizers-backed class (formerly T5TokenizerFast), built here from the `.model` file (`spiece.model`).
"""

import os

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf
from transformers import T5Tokenizer

from clippy_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_sentencepiece

MAX_LENGTH = 24
TRICKY = [
    "a photo of a dog",
    "",
    " ",
    "A Photo Of A DOG!!!",
    "Ünïcödé café naïve résumé — 東京タワー 😀🐕",
    "  leading, trailing   and\tinner\nwhitespace  ",
    "ﬁ ligatures, full-width ＡＢＣ１２３ and ① Ⅻ (NFKC)",
    "numbers 3.14159 2,718 1e-9 #hashtag @user http://example.com/a?b=c",
    "very long " * 60,
    "zzzzqqqq unseen-ish pieces ŧħŋ",
]


def _corpus() -> list[str]:
    rng = np.random.default_rng(0)
    words = ("a photo of the dog cat bird on in with red green blue small large two three person riding "
             "horse bicycle street water sky grass tree car bus train boat plane table chair café naïve 東京 😀 "
             "12345 3.14 #tag").split()
    return [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(3000)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("spm"))
    path = train_sentencepiece(_corpus(), os.path.join(directory, "spiece.model"), vocab_size=300)
    assert os.path.exists(path)
    return directory


def test_ids_equal_transformers_t5_tokenizer(model_dir):
    tokenizer = Tokenizer(os.path.join(model_dir, "spiece.model"), MAX_LENGTH)
    reference = T5Tokenizer.from_pretrained(model_dir, extra_ids=0)
    assert len(reference) == tokenizer.vocab_size
    ours = tokenizer.encode(TRICKY)
    for text, row in zip(TRICKY, ours):
        ids = reference(text, max_length=MAX_LENGTH, truncation=True)["input_ids"]
        assert row[: len(ids)].tolist() == ids, text
        assert (row[len(ids):] == PAD_ID).all(), text


def test_t5_conventions(model_dir):
    tokenizer = Tokenizer(os.path.join(model_dir, "spiece.model"), MAX_LENGTH)
    empty, long = tokenizer.encode(["", "very long " * 60])
    assert empty.tolist() == [EOS_ID] + [PAD_ID] * (MAX_LENGTH - 1)
    assert long[-1] == EOS_ID and (long[:-1] != PAD_ID).all()  # truncated to max_length - 1 pieces, then EOS
    assert tokenizer.encode(["a dog"]).dtype == np.int32


def test_tf_encode_equals_encode(model_dir):
    tokenizer = Tokenizer(os.path.join(model_dir, "spiece.model"), MAX_LENGTH)
    expected = tokenizer.encode(TRICKY)
    np.testing.assert_array_equal(tokenizer.tf_encode(tf.constant(TRICKY)).numpy(), expected)
    grid = tf.constant(np.array(TRICKY, dtype=object).reshape(2, 5))
    np.testing.assert_array_equal(tokenizer.tf_encode(grid).numpy(), expected.reshape(2, 5, MAX_LENGTH))
    mapped = tf.data.Dataset.from_tensor_slices(TRICKY).batch(4).map(tokenizer.tf_encode)
    np.testing.assert_array_equal(np.concatenate(list(mapped.as_numpy_iterator())), expected)


def test_rejects_a_model_without_t5_special_ids(model_dir, tmp_path):
    prefix = str(tmp_path / "default_ids")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_prefix=prefix, vocab_size=300,
                                   hard_vocab_limit=False, minloglevel=2)  # unk 0, bos 1, eos 2
    with pytest.raises(ValueError, match="T5 conventions need pad 0 and EOS 1"):
        Tokenizer(prefix + ".model", MAX_LENGTH)


@pytest.mark.parametrize("content", [b"", b"\x00garbage that is no model proto\xff" * 10])
def test_a_file_that_is_no_tokenizer_is_refused_at_start_up_naming_the_setting(tmp_path, content):
    from clippy_jax.config_checks import ConfigError
    from clippy_jax.train.loop import load_tokenizer

    path = tmp_path / "spiece.model"
    path.write_bytes(content)
    data = dict(tokenizer_path=str(path), max_text_length=MAX_LENGTH)
    with pytest.raises(ConfigError, match=rf"config.data.tokenizer_path='{path}' cannot be used: {path} is not a "
                                          r"SentencePiece model \(its \d+ bytes do not parse as one\)"):
        load_tokenizer(ml_collections.ConfigDict(data), wait_seconds=30)
    with pytest.raises(ConfigError, match=rf"config.data.tokenizer_path='{tmp_path}' cannot be used: .*directory"):
        load_tokenizer(ml_collections.ConfigDict(dict(data, tokenizer_path=str(tmp_path))), wait_seconds=30)
