"""Tokenizers: byte-level BPE trained with `tokenizers`, and raw bytes.

Both map every id to a fixed byte string, so the per-id byte-length table (`token_bytes`) is exact:
bits/byte = total NLL / (ln 2 x total bytes of the targets). The one special token, `<eos>`, has 0 bytes.
In the byte-level alphabet every character stands for exactly one byte, so a BPE token's byte length is
the length of its vocabulary string.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np

EOS = "<eos>"
BPE_FILE = "tokenizer.json"


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 text; 256 is `<eos>`."""

    kind = "bytes"
    eos_id = 256
    vocab_size = 257
    hash = "bytes-v1"

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        table = np.ones(self.vocab_size, dtype=np.int64)  # [V]
        table[self.eos_id] = 0
        return table

    def save(self, folder: Path) -> None:
        """Nothing to save: the vocabulary is fixed."""


class BPETokenizer:
    """Byte-level BPE (`tokenizers`): no UNK, exact decode, `<eos>` is id 0."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS)
        self.vocab_size = tokenizer.get_vocab_size()
        self.hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=np.int64)  # [V]
        for token, idx in self.tokenizer.get_vocab(with_added_tokens=False).items():
            table[idx] = len(token)
        table[self.eos_id] = 0
        return table

    def save(self, folder: Path) -> None:
        self.tokenizer.save(str(folder / BPE_FILE))


Tokenizer = Union[ByteTokenizer, BPETokenizer]


def train_bpe(texts: Iterable[str], num_texts: int, vocab_size: int) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with parallel_tokenizers():
        tok.train_from_iterator(texts, trainer=trainer, length=num_texts)
    return BPETokenizer(tok)


def load(folder: Path, kind: str) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_file(str(folder / BPE_FILE)))


class parallel_tokenizers:
    """Let `tokenizers` use its thread pool while preparing (the CLI and tests turn it off, for forked workers)."""

    def __enter__(self) -> None:
        self.saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true"

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.saved
