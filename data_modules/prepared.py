"""A prepared dataset as `prepare` (lrexp.data_modules.store) left it in its cache folder: `Prepared` reads
the folder's meta.json, tokenizer and token bytes, `SplitData` one split's memmaps, both lazily."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from lrexp.data_modules import tokenizer as tok_mod
from lrexp.data_modules.corpora import SPLITS

META = "meta.json"


class SplitData:
    """One split's memmaps, opened lazily (and again in each DataLoader worker: never pickled)."""

    def __init__(self, folder: Path, meta: Dict) -> None:
        self.dir = folder
        self.meta = meta

    def __getstate__(self) -> Dict:
        return {"dir": self.dir, "meta": self.meta}

    @cached_property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.dir / "tokens.bin", dtype=self.meta["dtype"], mode="r")  # [T]

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.load(self.dir / "offsets.npy")  # [D + 1] int64

    @cached_property
    def doc_bytes(self) -> np.ndarray:
        return np.load(self.dir / "doc_bytes.npy")  # [D] int64

    @cached_property
    def answer(self) -> Optional[np.ndarray]:
        path = self.dir / "answer.bin"
        return np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None  # [T]

    @cached_property
    def mention(self) -> Optional[np.ndarray]:
        path = self.dir / "mention.bin"
        return np.memmap(path, dtype=np.int32, mode="r") if path.is_file() else None  # [T]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [D] tokens per document, <eos> included

    def doc(self, i: int) -> np.ndarray:
        """Document i's tokens as int64, the dtype the model takes."""
        return self.tokens[self.offsets[i]: self.offsets[i + 1]].astype(np.int64)

    def doc_ids(self) -> List[str]:
        return json.loads((self.dir / "doc_ids.json").read_text())


class Prepared:
    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.meta: Dict = json.loads((folder / META).read_text())
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["tokenizer"]["eos_id"]
        self.key: str = self.meta["key"]
        self.probe: bool = self.meta["probe"]

    def __getstate__(self) -> Dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("tokenizer", "token_bytes", "_splits")}

    @cached_property
    def tokenizer(self) -> tok_mod.Tokenizer:
        return tok_mod.load(self.dir, self.meta["tokenizer"]["kind"])

    @cached_property
    def token_bytes(self) -> np.ndarray:
        return np.load(self.dir / "token_bytes.npy")  # [V] int64

    @cached_property
    def _splits(self) -> Dict[str, SplitData]:
        return {s: SplitData(self.dir / s, self.meta["splits"][s]) for s in SPLITS}

    def split(self, name: str) -> SplitData:
        return self._splits[name]
