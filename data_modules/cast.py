"""`cast`: generated stories whose invented names recur at every distance (docs/data.md#the-cast-corpus).

Each document draws a cast of `data.cast.cast_size` names, invented from syllables, so no name is shared
with another document except by chance: what a model knows of a document's names it can only know from
earlier in that document. Sentences are built from a small vocabulary of common words around one or two
cast members, each chosen with Zipf-like weights (the k-th name in proportion to 1/k), so frequent names come
back within a few words and rare ones many segments later; a name's first mention introduces it. The text is
ASCII under the bytes tokenizer, so a byte offset is a token offset and a distance is exact in tokens.

Every mention of a name is recorded as (start, end, distance): distance 0 on a first mention, else the
tokens from the previous mention's start. `prepare` stores them per token (`mention.bin`), and an
evaluation pass reports the loss on re-mentions by distance next to the loss on first mentions, the
reference for a model that has not read the earlier text (lrexp.lit.metrics.MentionStats).
"""

from __future__ import annotations

import itertools
import random
from typing import List, Tuple

from lrexp.config.schema import RunConfig
from lrexp.data_modules.documents import Document, Listing

GENERATOR = "v1"  # part of the fingerprint: a change to the text below must change it

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z")
_NUCLEI = ("a", "e", "i", "o", "u", "ae", "ou", "ia")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m")
_ROLES = ("baker", "sailor", "farmer", "teacher", "miner", "weaver", "doctor", "guard", "singer", "clerk")
_PLACES = ("market", "river", "harbour", "mill", "chapel", "bridge", "square", "garden", "station", "inn")
_THINGS = ("letter", "lamp", "basket", "key", "map", "coat", "boat", "bread", "ring", "book")
_VERBS = ("found", "lost", "carried", "mended", "sold", "hid", "opened", "painted")
_ONE = (
    "{a} walked to the {place} alone.",
    "In the morning {a} {verb} the {thing}.",
    "Nobody saw {a} near the {place} that day.",
    "{a} was tired and sat by the {place}.",
    "\"I will wait here,\" said {a}.",
)
_TWO = (
    "{a} met {b} at the {place}.",
    "{a} told {b} about the {thing}.",
    "{a} and {b} {verb} the {thing} together.",
    "\"Where is the {thing}?\" {a} asked {b}.",
    "{b} gave {a} a {thing} from the {place}.",
)
_INTRO = "There was a {role} called {a}, who lived near the {place}."
# data.cast.sentences=short: the same story in a few words a sentence, so names are about half the bytes and a
# frequent name comes back within a window or two (a denser copying signal for small models and short runs)
_SHORT_ONE = ("{a} slept.", "{a} ran home.", "{a} sang.", "{a} smiled.", "{a} sat down.")
_SHORT_TWO = ("{a} met {b}.", "{a} saw {b}.", "{a} thanked {b}.", "{b} helped {a}.", "{a} and {b} ate.")
_SHORT_INTRO = "{a} was a {role}."
TEMPLATES = {"prose": (_ONE, _TWO, _INTRO), "short": (_SHORT_ONE, _SHORT_TWO, _SHORT_INTRO)}

Mention = Tuple[int, int, int]  # [start, end) in bytes, and the distance to the previous mention (0: first)


def _name(rng: random.Random) -> str:
    syllables = rng.choice((2, 2, 3))
    word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _cast(rng: random.Random, size: int) -> List[str]:
    names: List[str] = []
    while len(names) < size:
        name = _name(rng)
        if name not in names:
            names.append(name)
    return names


def story(rng: random.Random, cast_size: int, length: int, sentences: str = "prose") -> Tuple[str, List[Mention]]:
    """About `length` bytes (whole sentences, stopping past it) and the mentions of the cast's names;
    `sentences` picks the templates (TEMPLATES)."""
    one, two, intro = TEMPLATES[sentences]
    names = _cast(rng, cast_size)
    # Zipf-like (the first names are the main characters), cumulated once: choices() would per call
    cumulative = list(itertools.accumulate(1.0 / (k + 1) for k in range(cast_size)))
    text, mentions, last = "", [], {}

    def fill(template: str, **who: str) -> None:
        nonlocal text
        words = {"place": rng.choice(_PLACES), "thing": rng.choice(_THINGS), "verb": rng.choice(_VERBS),
                 "role": rng.choice(_ROLES)}
        pieces = template.format(**words, **{k: f"\0{k}\0" for k in who}).split("\0")  # odd pieces: a, b
        for i, piece in enumerate(pieces):
            if i % 2:
                name, start = who[piece], len(text)
                mentions.append((start, start + len(name), start - last[name] if name in last else 0))
                last[name] = start
                piece = name
            text += piece
        text += "\n" if rng.random() < 0.15 else " "

    while len(text) < length:
        pair = rng.random() < 0.5
        a = rng.choices(names, cum_weights=cumulative)[0]
        b = rng.choices(names, cum_weights=cumulative)[0] if pair else a
        for name in dict.fromkeys((a, b)):
            if name not in last:  # a name's first mention introduces it
                fill(intro, a=name)
        if pair and b != a:
            fill(rng.choice(two), a=a, b=b)
        else:
            fill(rng.choice(one), a=a)
    return text, mentions


def listing(cfg: RunConfig) -> Listing:
    c = cfg.data.cast
    docs = []
    for i in range(c.num_docs):
        rng = random.Random(f"cast/{c.seed}/{i}")  # str seeds hash the same on every machine
        text, mentions = story(rng, c.cast_size, c.doc_bytes, c.sentences)
        docs.append(Document(id=f"cast/{i:06d}", read=_constant(text), size=len(text), mentions=tuple(mentions)))
    return Listing(
        name="cast",
        documents=docs,
        fingerprint={"corpus": "cast", "seed": c.seed, "num_docs": c.num_docs, "cast_size": c.cast_size,
                     "doc_bytes": c.doc_bytes, "generator": GENERATOR,
                     **({"sentences": c.sentences} if c.sentences != "prose" else {})},  # prose: caches stay valid
        sources=[{"name": f"generated stories, {c.cast_size} invented names each, seed {c.seed}",
                  "licence": "generated"}],
        mentions=True,
    )


def _constant(text: str):
    return lambda: text
