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
import re
import sysconfig
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from lrexp.config.schema import RunConfig
from lrexp.data_modules import cast, gutenberg, probes
from lrexp.data_modules.documents import Document, Listing, TableFile
from lrexp.data_modules.errors import DataError

SPLITS = ("train", "validation", "test")
_TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".zst", ".bz2", ".xz")


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

AUTO_SUFFIX = "auto"
# data.file_suffix=auto reads the one format a folder holds, told by the file endings; other files (a README,
# PG19's metadata.csv) are left out, and two of these formats in one folder are ambiguous.
_FORMATS = {
    "text (.txt)": (".txt",),
    "JSON-lines (.jsonl[.gz])": tuple(".jsonl" + c for c in ("", *_COMPRESSION)),
    "parquet (.parquet)": (".parquet",),
}
# Hugging Face names split shards `train-00000-of-00004.parquet`: in a flat folder the split is in the name.
_SHARD = re.compile(r"^(train|validation|test)-\d+-of-\d+\.")


def _table_kind(path: Path) -> Optional[str]:
    suffixes = [s for s in path.suffixes if s not in _COMPRESSION]
    return _TABLE_SUFFIXES.get(suffixes[-1]) if suffixes else None


def _select(path: Path, found: List[Path], suffix: str) -> List[Path]:
    """The files of a folder to read: those ending in `suffix`, or under `auto` those of its one format."""
    if suffix != AUTO_SUFFIX:
        files = [p for p in found if p.name.endswith(suffix)]
        if not files:
            raise DataError(f"no files ending in '{suffix}' under {path} (set data.file_suffix)")
        return files
    present = {fmt: files for fmt, ends in _FORMATS.items() if (files := [p for p in found if p.name.endswith(ends)])}
    if not present:
        raise DataError(f"no .txt, .jsonl[.gz] or .parquet files under {path}; set data.file_suffix to the ending "
                        "of its files ('' for all)")
    if len(present) > 1:
        have = " and ".join(f"{len(files)} {fmt}" for fmt, files in present.items())
        raise DataError(f"{path} holds {have} files; set data.file_suffix to the ending of the ones to read")
    return next(iter(present.values()))


def corpus_files(path: Path, suffix: str) -> Tuple[Path, List[Path], bool]:
    """(root, the files to read, whether train/ validation/ test/ folders give the splits): names and `stat`
    only, cheap enough for every command to check a corpus folder before any work."""
    if not path.exists():
        raise DataError(f"corpus path not found: {path}")
    if path.is_file():
        return path.parent, [path], False
    layout = (path / "train").is_dir()
    tops = [path / s for s in SPLITS if (path / s).is_dir()] if layout else [path]
    found = sorted(p for top in tops for p in top.rglob("*") if p.is_file())
    return path, _select(path, found, suffix), layout


def _file_split(rel: str, layout: bool) -> Optional[str]:
    if layout:
        return rel.split("/", 1)[0]
    shard = _SHARD.match(rel.rsplit("/", 1)[-1])
    return shard.group(1) if shard else None


def table_documents(tables: List[TableFile], text_field: str, hf_cache: Path,
                    on_file: Callable[[TableFile], None]) -> List[Document]:
    """The rows of JSON-lines / parquet files as documents, via the packaged `datasets` builders (offline, no
    scripts). `hf_cache` is scratch: the caller removes it, with the arrow copies and the `.lock` files
    `datasets` leaves there. Its own progress bars (one per file, each labelled "train") are off: the
    caller's one bar reports each file through `on_file`."""
    if not tables:
        return []
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # heavy import, only for tables

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        docs: List[Document] = []
        for table in tables:
            on_file(table)
            docs.extend(_rows(table, text_field, hf_cache))
        return docs
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _rows(table: TableFile, text_field: str, hf_cache: Path) -> List[Document]:
    from datasets import load_dataset

    kind = _table_kind(table.path)
    try:
        rows = load_dataset(kind, data_files=str(table.path), split="train", cache_dir=str(hf_cache))
    except Exception as exc:  # a malformed file: one line naming it
        raise DataError(f"{table.path}: cannot be read as {kind} ({str(exc).splitlines()[0]})") from None
    if text_field not in rows.column_names:
        raise DataError(
            f"{table.path}: no text field '{text_field}' (columns: {', '.join(rows.column_names)}); set data.text_field"
        )
    column = rows.select_columns([text_field])
    return [Document(id=f"{table.rel}:{i}", read=partial(_row_text, column, text_field, i), split=table.split)
            for i in range(len(column))]


def _row_text(table, text_field: str, row: int) -> str:
    value = table[row][text_field]
    return value if isinstance(value, str) else ""


def directory(path: Path, cfg: RunConfig) -> Listing:
    """A PG19 layout (train/ validation/ test/ give the splits), any folder of files, or one file; the rows
    of table files are listed as `tables` and read only by a prepare that builds."""
    suffix = cfg.data.file_suffix
    root, files, layout = corpus_files(path, suffix)
    docs: List[Document] = []
    tables: List[TableFile] = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if _table_kind(p):
            tables.append(TableFile(p, rel, _file_split(rel, layout)))
        else:
            docs.append(Document(id=rel, read=partial(Path.read_bytes, p), size=p.stat().st_size,
                                 split=_file_split(rel, layout)))
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
        tables=tables,
        fingerprint=fingerprint,
        sources=[{"name": path.resolve().name, "path": str(path.resolve()), "licence": "user corpus (not recorded)"}],
    )


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _gutenberg(cfg: RunConfig, cache_root: Path) -> Listing:
    return gutenberg.listing(cache_root)


def _probe(kind: str, cfg: RunConfig, cache_root: Path) -> Listing:
    return probes.listing(kind, cfg)


def _cast(cfg: RunConfig, cache_root: Path) -> Listing:
    return cast.listing(cfg)


CORPORA: Dict[str, Callable[[RunConfig, Path], Listing]] = {
    "stdlib": stdlib,
    "gutenberg": _gutenberg,
    "passkey": partial(_probe, "passkey"),
    "assoc_recall": partial(_probe, "assoc_recall"),
    "copy": partial(_probe, "copy"),
    "cast": _cast,
}
PROBES = ("passkey", "assoc_recall", "copy")
BYTE_EXACT = (*PROBES, "cast")  # generated corpora whose marks are byte offsets: the bytes tokenizer only


def _user_path(name: str) -> Path:
    """A corpus that is not a registered name: a path, relative to the working directory."""
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"corpus '{name}' is neither a known corpus ({', '.join(CORPORA)}) nor an existing path")
    return path


def check_source(cfg: RunConfig) -> None:
    """What `list_corpus` would fail on, from names and `stat` alone: an unknown corpus, a folder without
    files of one readable format."""
    if cfg.data.corpus not in CORPORA:
        corpus_files(_user_path(cfg.data.corpus), cfg.data.file_suffix)


def list_corpus(cfg: RunConfig, cache_root: Path) -> Listing:
    """The documents of `cfg.data.corpus`: a registered name, else a path (relative to the working directory)."""
    name = cfg.data.corpus
    if name in CORPORA:
        listing = CORPORA[name](cfg, cache_root)
    else:
        listing = directory(_user_path(name), cfg)
    if not listing.documents and not listing.tables:
        raise DataError(f"corpus '{name}' has no documents")
    return listing


def fingerprint_key(payload: Dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
