"""What a corpus lists: its documents, the table files whose rows are documents, and the listing itself.

A leaf module: the corpus registry (lrexp.data_modules.corpora) imports the corpora that build listings
(gutenberg, probes, cast), and they import these types from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union


FIRST_MENTION = -1  # mention.bin's value on a name's first mention (0: not a name; > 0: a distance)


@dataclass
class Document:
    id: str  # stable across machines: the split is a hash of it
    read: Callable[[], Union[bytes, str]]  # bytes are checked for UTF-8 by the caller
    size: Optional[int] = None  # bytes, when known without reading (selects the data.max_bytes subset)
    split: Optional[str] = None  # fixed by the layout (PG19 folders); None: by hash of the id
    answers: Tuple[Tuple[int, int], ...] = ()  # probes: [start, end) byte spans of the answer text
    # mention corpora (cast): (start, end, distance) byte spans of a name and the bytes back to its
    # previous mention's start (0 on a first mention)
    mentions: Tuple[Tuple[int, int, int], ...] = ()


@dataclass
class TableFile:
    """A JSON-lines / parquet file whose rows are documents; read only when a prepare builds (`table_documents`)."""

    path: Path
    rel: str  # relative to the corpus root: the prefix of its rows' ids
    split: Optional[str]


@dataclass
class Listing:
    name: str  # short, used in the cache folder name
    documents: List[Document]
    fingerprint: Dict  # identifies the content; part of the cache key
    sources: List[Dict[str, str]]  # {"name", "licence", and "path" or "url"}
    probe: bool = False  # synthetic: per-token answer flags are stored
    mentions: bool = False  # per-token mention distances are stored (docs/data.md#the-cast-corpus)
    notes: List[str] = field(default_factory=list)  # dropped duplicates and the like, for meta.json
    tables: List[TableFile] = field(default_factory=list)  # files whose rows are documents, read on a build
