"""Corpora as lists of documents: the embedded stdlib, user directories and tables, and the named registry.

Listing a corpus is cheap (names and `stat` only, or an archive already on disk); the text is read later,
by `store.prepare`, and only when the cache misses. Every listing carries a fingerprint (everything that
identifies its content, so a changed file changes the cache key), its sources and licences, and documents
with stable ids: the split of a document is a hash of its id, the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from lrexp.config import RunConfig
from lrexp.data_modules.errors import DataError

SPLITS = ("train", "validation", "test")
_TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz")


@dataclass
class Document:
    id: str  # stable across machines: the split is a hash of it
    read: Callable[[], Union[bytes, str]]  # bytes are checked for UTF-8 by the caller
    size: Optional[int] = None  # bytes, when known without reading (selects the data.max_bytes subset)
    split: Optional[str] = None  # fixed by the layout (PG19 folders); None: by hash of the id
    answers: Tuple[Tuple[int, int], ...] = ()  # probes: [start, end) byte spans of the answer text


@dataclass
class Listing:
    name: str  # short, used in the cache folder name
    documents: List[Document]
    fingerprint: Dict  # identifies the content; part of the cache key
    sources: List[Dict[str, str]]  # {"name", "licence", and "path" or "url"}
    probe: bool = False  # synthetic: per-token answer flags are stored
    notes: List[str] = field(default_factory=list)  # dropped duplicates and the like, for meta.json


def split_of(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a document: a uniform number from the SHA-1 of its id against the fractions."""
    u = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def files_fingerprint(root: Path, files: List[Path]) -> str:
    """Hash of (relative path, size, mtime) of every file: an edited, added or removed file changes it."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# stdlib: the running interpreter's standard library, one document per .py file
# --------------------------------------------------------------------------------------------------

_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def _is_test(rel: Path) -> bool:
    return any(part in _TEST_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_")


def stdlib(cfg: RunConfig, cache_root: Path) -> Listing:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and not (cfg.data.exclude_tests and _is_test(path.relative_to(root))):
                files.append(path)
    version = platform.python_version()
    docs = [
        Document(id="stdlib/" + p.relative_to(root).as_posix(), read=partial(Path.read_bytes, p), size=p.stat().st_size)
        for p in files
    ]
    return Listing(
        name="stdlib",
        documents=docs,
        fingerprint={
            "corpus": "stdlib",
            "python": version,
            "root": str(root),
            "exclude_tests": cfg.data.exclude_tests,
            "files": files_fingerprint(root, files),
        },
        sources=[{"name": f"CPython {version} standard library", "path": str(root), "licence": "PSF-2.0"}],
    )


# --------------------------------------------------------------------------------------------------
# User corpora: a PG19-layout folder, any folder of text files, JSON-lines / parquet tables
# --------------------------------------------------------------------------------------------------


def _table_kind(path: Path) -> Optional[str]:
    suffixes = [s for s in path.suffixes if s not in _COMPRESSION]
    return _TABLE_SUFFIXES.get(suffixes[-1]) if suffixes else None


def _table_documents(path: Path, rel: str, text_field: str, hf_cache: Path) -> List[Document]:
    """Rows of a JSON-lines / parquet file via the packaged `datasets` builders (offline, no scripts)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset  # heavy import, only for tables

    try:
        table = load_dataset(_table_kind(path), data_files=str(path), split="train", cache_dir=str(hf_cache))
    except Exception as exc:  # a malformed file: one line naming it
        raise DataError(f"{path}: cannot be read as {_table_kind(path)} ({str(exc).splitlines()[0]})") from None
    if text_field not in table.column_names:
        raise DataError(
            f"{path}: no text field '{text_field}' (columns: {', '.join(table.column_names)}); set data.text_field"
        )
    column = table.select_columns([text_field])
    return [Document(id=f"{rel}:{i}", read=partial(_row_text, column, text_field, i)) for i in range(len(column))]


def _row_text(table, text_field: str, row: int) -> str:
    value = table[row][text_field]
    return value if isinstance(value, str) else ""


def directory(path: Path, cfg: RunConfig, cache_root: Path) -> Listing:
    """A PG19 layout (train/ validation/ test/ give the splits), any folder of files, or one file."""
    if not path.exists():
        raise DataError(f"corpus path not found: {path}")
    suffix = cfg.data.file_suffix
    if path.is_file():
        root, files, layout = path.parent, [path], None
    else:
        root = path
        layout = [s for s in SPLITS if (path / s).is_dir()] if (path / "train").is_dir() else None
        tops = [path / s for s in layout] if layout else [path]
        files = sorted(p for top in tops for p in top.rglob("*") if p.is_file() and p.name.endswith(suffix))
    if not files:
        raise DataError(f"no files ending in '{suffix}' under {path} (set data.file_suffix)")

    docs: List[Document] = []
    tables = False
    for p in files:
        rel = p.relative_to(root).as_posix()
        split = rel.split("/", 1)[0] if layout else None
        if _table_kind(p):
            tables = True
            for doc in _table_documents(p, rel, cfg.data.text_field, cache_root / "hf_datasets"):
                doc.split = split
                docs.append(doc)
        else:
            docs.append(Document(id=rel, read=partial(Path.read_bytes, p), size=p.stat().st_size, split=split))
    fingerprint = {
        "corpus": "directory",
        "path": str(path.resolve()),
        "layout": "pg19" if layout else "flat",
        "file_suffix": suffix,
        "files": files_fingerprint(root, files),
    }
    if tables:
        fingerprint["text_field"] = cfg.data.text_field
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.resolve().name) or "corpus"
    return Listing(
        name=name,
        documents=docs,
        fingerprint=fingerprint,
        sources=[{"name": path.resolve().name, "path": str(path.resolve()), "licence": "user corpus (not recorded)"}],
    )


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _gutenberg(cfg: RunConfig, cache_root: Path) -> Listing:
    from lrexp.data_modules import gutenberg

    return gutenberg.listing(cache_root)


def _probe(kind: str, cfg: RunConfig, cache_root: Path) -> Listing:
    from lrexp.data_modules import probes

    return probes.listing(kind, cfg)


CORPORA: Dict[str, Callable[[RunConfig, Path], Listing]] = {
    "stdlib": stdlib,
    "gutenberg": _gutenberg,
    "passkey": partial(_probe, "passkey"),
    "assoc_recall": partial(_probe, "assoc_recall"),
    "copy": partial(_probe, "copy"),
}
PROBES = ("passkey", "assoc_recall", "copy")


def list_corpus(cfg: RunConfig, cache_root: Path) -> Listing:
    """The documents of `cfg.data.corpus`: a registered name, else a path (relative to the working directory)."""
    name = cfg.data.corpus
    if name in CORPORA:
        listing = CORPORA[name](cfg, cache_root)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(
                f"corpus '{name}' is neither a known corpus ({', '.join(CORPORA)}) nor an existing path"
            )
        listing = directory(path, cfg, cache_root)
    if not listing.documents:
        raise DataError(f"corpus '{name}' has no documents")
    return listing


def fingerprint_key(payload: Dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
