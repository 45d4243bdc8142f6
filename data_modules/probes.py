"""Synthetic long-range probes, generated deterministically from (kind, seed, document index).

Each document places the information the answer needs at least `data.probe.distance` segments
(distance x N tokens) before the answer, so a test can put it beyond the attention window and the XL
cache. The text is ASCII and probes use the bytes tokenizer, so a byte offset is a token offset and the
distance is exact. Every document records the byte spans of its answer text; `prepare` stores them as a
per-token answer flag, and the batches carry `answer_mask`: runs log the loss on the answers alone.

Trained on alone, a probe teaches a recurrent state nothing: the state crosses segment boundaries detached,
so an answer at distance >= 1 sends no gradient to the block that stored its information (docs/data.md#probes;
tests/equivalence/test_rec_learning.py rehearses the key inside its segment for that reason).

- `passkey`: a 5-digit key stated once, filler, then "The pass key is " and the key (the answer).
- `assoc_recall`: key=value pairs, filler, then every key again in another order with its value (answers).
- `copy`: a random string of distance x N characters, " | ", then the same string (the answer).
"""

from __future__ import annotations

import random
import string
from typing import List, Tuple

from lrexp.config.schema import RunConfig
from lrexp.data_modules.documents import Document, Listing

# Filler words: lowercase, no digits, so a key or value is never repeated by chance.
_WORDS = (
    "the grass is green and the sky is blue while the sun shines over a quiet town where people walk "
    "slowly along the river past old houses gardens and small shops that open early in the morning"
).split()


def _filler(rng: random.Random, length: int) -> str:
    """Exactly `length` characters of word salad."""
    words: List[str] = []
    size = 0
    while size < length:
        word = rng.choice(_WORDS) + ("." if rng.random() < 0.1 else "")
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def passkey(rng: random.Random, gap: int, pre: int) -> Tuple[str, List[Tuple[int, int]]]:
    key = str(rng.randrange(10_000, 100_000))
    head = _filler(rng, pre) + f" The pass key is {key}. Remember it. " + _filler(rng, gap)
    head += " What is the pass key? The pass key is "
    return head + key + ".\n", [(len(head), len(head) + len(key))]


def assoc_recall(rng: random.Random, gap: int, pre: int, num_pairs: int) -> Tuple[str, List[Tuple[int, int]]]:
    keys: List[str] = []
    while len(keys) < num_pairs:
        key = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
        if key not in keys:
            keys.append(key)
    values = {k: str(rng.randrange(1000, 10_000)) for k in keys}
    text = _filler(rng, pre) + " Pairs: " + "; ".join(f"{k}={values[k]}" for k in keys) + ". "
    text += _filler(rng, gap) + " Recall:"
    spans = []
    for key in rng.sample(keys, len(keys)):
        text += f" {key}="
        spans.append((len(text), len(text) + len(values[key])))
        text += values[key] + ";"
    return text + "\n", spans


def copy(rng: random.Random, gap: int, pre: int) -> Tuple[str, List[Tuple[int, int]]]:
    body = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(gap))
    head = _filler(rng, pre) + " Copy: " + body + " | "
    return head + body + "\n", [(len(head), len(head) + len(body))]


def listing(kind: str, cfg: RunConfig) -> Listing:
    p = cfg.data.probe
    n = cfg.derived.segment_len
    gap = p.distance * n
    docs = []
    for i in range(p.num_docs):
        rng = random.Random(f"{kind}/{p.seed}/{i}")  # str seeds hash the same on every machine
        pre = rng.randrange(n)  # where in a segment the information lands varies per document
        if kind == "passkey":
            text, spans = passkey(rng, gap, pre)
        elif kind == "assoc_recall":
            text, spans = assoc_recall(rng, gap, pre, p.num_pairs)
        else:
            text, spans = copy(rng, gap, pre)
        docs.append(Document(id=f"{kind}/{i:06d}", read=_constant(text), size=len(text), answers=tuple(spans)))
    fingerprint = {"corpus": kind, "seed": p.seed, "distance": p.distance, "num_docs": p.num_docs,
                   "segment_len": n, "generator": "v1"}
    if kind == "assoc_recall":
        fingerprint["num_pairs"] = p.num_pairs
    return Listing(
        name=kind,
        documents=docs,
        fingerprint=fingerprint,
        sources=[{"name": f"synthetic {kind} probe, seed {p.seed}, distance {p.distance} segments",
                  "licence": "generated"}],
        probe=True,
    )


def _constant(text: str):
    return lambda: text
