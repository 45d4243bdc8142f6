"""Tokenizers: byte-level BPE trained with `tokenizers`, a `tokenizers` JSON file from disk, and raw bytes.

Bytes and byte-level BPE map every id to a fixed byte string, so the per-id byte-length table
(`token_bytes`) is exact: bits/byte = total NLL / (ln 2 x total bytes of the targets). The end-of-document
token has 0 bytes. In the byte-level alphabet every character stands for exactly one byte, so a BPE token's
byte length is the length of its vocabulary string. A file's model need not be byte-level (T5's is a
SentencePiece unigram, whose normaliser drops newlines and maps unknown characters to <unk>): its table
counts the text each vocabulary string stands for, so bits/byte is approximate there.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from lrexp.data_modules.errors import DataError

EOS = "<eos>"
# A file's end-of-document token: the first of these in its vocabulary (ours, T5's and Llama's, GPT-2's).
EOS_NAMES = (EOS, "</s>", "<|endoftext|>")
BPE_FILE = "tokenizer.json"
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece's byte tokens


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


class HFTokenizer:
    """A `tokenizers` model: the trained byte-level BPE (kind "bpe": no UNK, exact decode, `<eos>` is id 0) or a
    tokenizer.json from disk (kind "file"), used as it is."""

    def __init__(self, tokenizer, kind: str = "bpe", source: str = "the trained BPE") -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        eos = next((t for t in EOS_NAMES if tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"{source} has no end-of-document token (one of {', '.join(EOS_NAMES)})")
        self.eos_id = tokenizer.token_to_id(eos)
        self.vocab_size = tokenizer.get_vocab_size()
        self.hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        # No post-processor tokens (T5's appends </s>): data.append_eos decides about the end of a document.
        encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        byte_level = "ByteLevel" in _types(json.loads(self.tokenizer.to_str()).get("decoder"))
        table = np.zeros(self.vocab_size, dtype=np.int64)  # [V]; added (special) tokens stay 0
        for token, idx in self.tokenizer.get_vocab(with_added_tokens=False).items():
            table[idx] = len(token) if byte_level else _text_bytes(token)
        table[self.eos_id] = 0
        return table

    def save(self, folder: Path) -> None:
        self.tokenizer.save(str(folder / BPE_FILE))


def _types(node) -> set:
    """Every "type" named in a tokenizer.json component (decoders nest in Sequence)."""
    if isinstance(node, dict):
        return {node.get("type")} | set().union(*(_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node))
    return set()


def _text_bytes(token: str) -> int:
    """UTF-8 bytes a non-byte-level token stands for: SentencePiece's "▁" is a space and "<0x0A>" one byte,
    WordPiece's "##" continuation prefix none."""
    if _BYTE_FALLBACK.match(token):
        return 1
    return len(token.removeprefix("##").replace("▁", " ").encode("utf-8"))


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def train_bpe(texts: Iterable[str], num_texts: int, vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with tokenizers_parallelism(True):
        tok.train_from_iterator(texts, trainer=trainer, length=num_texts)
    return HFTokenizer(tok)


def from_file(path: Path) -> HFTokenizer:
    """`data.tokenizer_file`: a `tokenizers` JSON file (tokenizer.json), or one line saying why it cannot be."""
    from tokenizers import Tokenizer as RustTokenizer

    if not path.is_file():
        raise DataError(f"data.tokenizer_file not found: {path}")
    try:
        tok = RustTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust error: unreadable JSON, an unknown model
        raise DataError(f"data.tokenizer_file {path}: not a tokenizers JSON file ({str(exc).splitlines()[0]})") from None
    return HFTokenizer(tok, kind="file", source=f"data.tokenizer_file {path}")


def load(folder: Path, kind: str) -> Tokenizer:
    """The tokenizer a prepared folder was built with (a file's copy is saved there too)."""
    if kind == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer as RustTokenizer

    return HFTokenizer(RustTokenizer.from_file(str(folder / BPE_FILE)), kind=kind)


# --------------------------------------------------------------------------------------------------
# Encoding a stream of chunks over worker processes
# --------------------------------------------------------------------------------------------------

_IN_FLIGHT = 2  # chunks queued per worker: enough to keep each busy, few enough to bound memory
_worker_tokenizer: Optional[Tokenizer] = None  # the tokenizer of a worker process, set by its initializer


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _worker_tokenizer = tok


def _encode_in_worker(texts: List[str]) -> List[np.ndarray]:
    return _worker_tokenizer.encode_batch(texts)


def encode_chunks(tok: Tokenizer, chunks: Iterable[Tuple[Any, List[str]]], workers: int
                  ) -> Iterator[Tuple[Any, List[np.ndarray]]]:
    """(tag, the ids of each text) for every (tag, texts) of `chunks`, in their order, with `workers` processes
    each encoding on one core. Encoding a text does not depend on the others, so the ids are the same bit
    for bit for any number of workers. Streaming: `chunks` is read only as workers free up (at most
    _IN_FLIGHT chunks per worker are held), so memory is bounded whatever the corpus size."""
    chunks = iter(chunks)
    first = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(first, chunks)
    if workers <= 1 or len(first) < 2:  # one chunk: starting processes would cost more than it encodes
        with tokenizers_parallelism(False):  # one core, the same as one worker
            for tag, texts in chunks:
                yield tag, tok.encode_batch(texts)
        return
    # Fresh processes, not forks: a forked worker inherits every lock another thread of this process held at
    # that moment (MLflow's, torch's, a logger's), and one such deadlock hung a grid cell that prepared its
    # corpus inside `lrexp train`. The tokenizer travels pickled; parallelism off in the workers' environment.
    spawn = multiprocessing.get_context("spawn")
    with tokenizers_parallelism(False), spawn.Pool(workers, _init_worker, (tok,)) as pool:
        pending: deque = deque()  # (tag, AsyncResult), oldest first
        for tag, texts in chunks:
            if len(pending) >= _IN_FLIGHT * workers:
                done_tag, result = pending.popleft()
                yield done_tag, result.get()
            pending.append((tag, pool.apply_async(_encode_in_worker, (texts,))))
        while pending:
            done_tag, result = pending.popleft()
            yield done_tag, result.get()


class tokenizers_parallelism:
    """`tokenizers`' own thread pool on (the BPE trainer) or off (encoding: one core per worker), restored on
    exit (the CLI and tests turn it off, for forked workers)."""

    def __init__(self, on: bool = True) -> None:
        self.value = "true" if on else "false"

    def __enter__(self) -> None:
        self.saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = self.value

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.saved
