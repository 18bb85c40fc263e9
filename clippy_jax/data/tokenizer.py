"""SentencePiece tokenizer with T5's conventions: pad 0, EOS 1 appended, UNK 2, no BOS.

The same `.model` file drives Python-side encoding (prompts) and in-graph encoding in tf.data
(`tensorflow_text.SentencepieceTokenizer`). Sequences are truncated to `max_length - 1` pieces
before EOS is appended (transformers' T5Tokenizer behaviour), then padded with 0.
"""

import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm
from etils import epath

if TYPE_CHECKING:  # TensorFlow only for tf.data's in-graph encoding (`tf_encode`); inference runs without it
    import tensorflow as tf

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int) -> str:
    """Trains a unigram SentencePiece model with T5's special ids and writes it to `model_path`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    epath.Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(model_path).write_bytes(model.getvalue())
    return model_path


class Tokenizer:
    """Loads any SentencePiece `.model` (for example T5's 32k vocabulary)."""

    def __init__(self, model_path: str, max_length: int):
        self.model_proto = epath.Path(model_path).read_bytes()
        try:
            self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError:
            self.processor = None
        if self.processor is None or not self.processor.get_piece_size():
            raise ValueError(f"{model_path} is not a SentencePiece model (its {len(self.model_proto)} bytes do not "
                             "parse as one)")
        self.max_length = max_length
        if self.processor.pad_id() != PAD_ID or self.processor.eos_id() != EOS_ID:
            raise ValueError(
                f"{model_path} has pad id {self.processor.pad_id()} and EOS id {self.processor.eos_id()}; "
                f"T5 conventions need pad {PAD_ID} and EOS {EOS_ID}."
            )

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), max_length] int32 ids."""
        out = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        for i, ids in enumerate(self.processor.encode(list(texts))):
            ids = ids[: self.max_length - 1] + [EOS_ID]
            out[i, : len(ids)] = ids
        return out

    def tf_encode(self, texts: "tf.Tensor") -> "tf.Tensor":
        """In-graph version of `encode` for a string tensor of any rank: [..., max_length] int32."""
        import tensorflow as tf  # noqa: PLC0415 (heavy imports, only where tf.data needs them)
        import tensorflow_text  # noqa: PLC0415

        flat = tf.reshape(texts, [-1])
        pieces = tensorflow_text.SentencepieceTokenizer(model=self.model_proto, out_type=tf.int32).tokenize(flat)
        eos = tf.fill([tf.shape(flat)[0], 1], EOS_ID)
        ids = tf.concat([pieces[:, : self.max_length - 1], eos], axis=1)
        ids = ids.to_tensor(default_value=PAD_ID, shape=[None, self.max_length])
        return tf.reshape(ids, tf.concat([tf.shape(texts), [self.max_length]], axis=0))
