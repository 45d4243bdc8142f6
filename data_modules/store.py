"""`prepare(cfg)`: a corpus -> per-split token memmaps, cached by a key of everything that shapes them.

Layout of `<cache_dir>/<corpus>-<tokenizer>-<key>/`:
  meta.json            tokenizer (kind, hash, vocab), dtype, per-split counts, sources and licences, skips
  token_bytes.npy      int64 [V]: UTF-8 bytes of each id (0 for `<eos>`), for bits/byte
  tokenizer.json       the trained BPE or a copy of data.tokenizer_file (absent for bytes)
  <split>/tokens.bin   uint16 (V <= 65535) or uint32 memmap of every document, `<eos>` appended
  <split>/offsets.npy  int64 [D + 1]: document i is tokens[offsets[i]:offsets[i+1]]
  <split>/doc_bytes.npy int64 [D]: UTF-8 bytes of each document
  <split>/answer.bin   uint8 per token, probes only: 1 on answer tokens
  <split>/mention.bin  int32 per token, mention corpora only: 0 off a name, -1 on a first mention, else the
                       tokens back to the previous mention of the same name
  <split>/doc_ids.json, <split>/meta.json

The folder is built under a temporary name and renamed when complete, so a killed prepare is never
mistaken for a finished one; a changed setting or corpus file gives another key, never a stale dataset.
The finished folder is read back through `Prepared` (lrexp.data_modules.prepared).
`datasets` reads table files into a scratch cache inside that folder, removed before the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lrexp.config.errors import ConfigError
from lrexp.config.paths import project_path
from lrexp.config.schema import RunConfig
from lrexp.data_modules import cast
from lrexp.data_modules import tokenizer as tok_mod
from lrexp.data_modules.corpora import (BYTE_EXACT, PROBES, SPLITS, fingerprint_key, list_corpus, split_of,
                                        table_documents)
from lrexp.data_modules.documents import FIRST_MENTION, Document, Listing, TableFile
from lrexp.data_modules.errors import DataError
from lrexp.data_modules.prepared import META, Prepared
from lrexp.runtime.cpus import usable_cpus
from lrexp.train.curriculum import stages

FORMAT_VERSION = 1
# A chunk is one encode_batch call: at most this many documents and (past its first document) bytes of text,
# so the chunks queued for the workers stay small even for books (PG19's run to megabytes each).
_CHUNK_DOCS = 256
_CHUNK_BYTES = 4 << 20
_HF_SCRATCH = "hf_datasets"  # datasets' cache while a build reads table files; inside the partial folder


# --------------------------------------------------------------------------------------------------
# Checks (one line each, before long work)
# --------------------------------------------------------------------------------------------------


def check_config(cfg: RunConfig) -> None:
    d = cfg.data
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(d, name) < 1.0:
            raise ConfigError(f"'data.{name}' must be in [0, 1), got {getattr(d, name)}")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError("'data.val_fraction' + 'data.test_fraction' must leave documents for training")
    if d.max_bytes is not None and d.max_bytes <= 0:
        raise ConfigError(f"'data.max_bytes' must be > 0 (or null for no cap), got {d.max_bytes}")
    if d.tokenizer_file and d.tokenizer == "bytes":
        raise ConfigError("'data.tokenizer_file' replaces the trained BPE; it cannot be used with data.tokenizer=bytes")
    if d.tokenizer_file:
        tok_mod.from_file(tokenizer_path(cfg))  # a missing or unreadable file: one line, before any reading
    if d.tokenizer == "bpe" and not d.tokenizer_file and not 257 <= d.vocab_size < 2**32:
        raise ConfigError(f"'data.vocab_size' must be >= 257 (256 bytes + <eos>) for byte-level BPE, got {d.vocab_size}")
    if not d.text_field:
        raise ConfigError("'data.text_field' must not be empty")
    if d.corpus in BYTE_EXACT and d.tokenizer != "bytes":
        raise ConfigError(
            f"corpus '{d.corpus}' is generated with distances exact in bytes: set data.tokenizer=bytes"
        )
    if d.corpus == "cast":
        for name in ("num_docs", "cast_size", "doc_bytes"):
            if getattr(d.cast, name) <= 0:
                raise ConfigError(f"'data.cast.{name}' must be > 0, got {getattr(d.cast, name)}")
        if d.cast.sentences not in cast.TEMPLATES:
            raise ConfigError(f"'data.cast.sentences' is '{d.cast.sentences}'; allowed: {', '.join(cast.TEMPLATES)}")
    if d.corpus in PROBES:
        for name in ("distance", "num_docs", "num_pairs"):
            if getattr(d.probe, name) <= 0:
                raise ConfigError(f"'data.probe.{name}' must be > 0, got {getattr(d.probe, name)}")


def tokenizer_kind(cfg: RunConfig) -> str:
    """"bytes", "bpe" (trained here) or "file" (data.tokenizer_file)."""
    return "file" if cfg.data.tokenizer_file else cfg.data.tokenizer


def tokenizer_path(cfg: RunConfig) -> Path:
    return Path(cfg.data.tokenizer_file).expanduser()


def vocab_size(cfg: RunConfig) -> int:
    """The vocabulary the prepared corpus will have, before preparing it (a tokenizer file is loaded, and
    one that cannot be is named in one line)."""
    kind = tokenizer_kind(cfg)
    if kind == "file":
        return tok_mod.from_file(tokenizer_path(cfg)).vocab_size
    return tok_mod.ByteTokenizer.vocab_size if kind == "bytes" else cfg.data.vocab_size


def check_stream(prepared: Prepared, segment_len: int, total_lanes: int) -> None:
    """The prepared corpus can feed `total_lanes` lanes of `segment_len` tokens."""
    longest = max(int(prepared.split(s).doc_lengths().max(initial=0)) for s in SPLITS)
    if segment_len > longest:
        raise DataError(
            f"segment length {segment_len} is larger than every document of corpus '{prepared.meta['corpus']}' "
            f"(longest: {longest} tokens); use shorter segments or a corpus of longer documents"
        )
    train_docs = int((prepared.split("train").doc_lengths() >= 2).sum())
    if train_docs < total_lanes:
        raise DataError(
            f"the train split of corpus '{prepared.meta['corpus']}' has {train_docs} documents, fewer than the "
            f"{total_lanes} lanes (tokens_per_step / segment_len x devices); use a larger corpus or fewer lanes"
        )


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


def cache_root(cfg: RunConfig) -> Path:
    return project_path(Path(cfg.data.cache_dir).expanduser())


def cache_key(listing: Listing, cfg: RunConfig) -> str:
    d = cfg.data
    payload = {
        "format": FORMAT_VERSION,
        "corpus": listing.fingerprint,
        "tokenizer": d.tokenizer,
        "vocab_size": d.vocab_size if tokenizer_kind(cfg) == "bpe" else None,
        "append_eos": d.append_eos,
        "max_bytes": d.max_bytes,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
    }
    if d.max_bytes is not None:  # subsets chosen in the salted order: never the key of an unsalted one
        payload["budget_order"] = "salted"
    if d.tokenizer_file:  # its content, not its path: an edited file is another key, a moved one the same
        payload["tokenizer_file"] = hashlib.sha256(tokenizer_path(cfg).read_bytes()).hexdigest()
    return fingerprint_key(payload)


def prepare(cfg: RunConfig) -> Prepared:
    """Tokens, offsets and meta of every split of `cfg.data.corpus`; a cache hit when nothing changed."""
    check_config(cfg)
    root = cache_root(cfg)
    listing = list_corpus(cfg, root)
    key = cache_key(listing, cfg)
    final = root / f"{listing.name}-{tokenizer_kind(cfg)}-{key[:16]}"
    if not (final / META).is_file():
        _build(listing, cfg, key, final)
    prepared = Prepared(final)
    check_stream(prepared, cfg.derived.segment_len, cfg.derived.lanes)
    for stage in stages(cfg):  # a curriculum's stages read lanes and segments of their own
        check_stream(prepared, stage.segment_len, stage.lanes)
    return prepared


def _read_text(doc: Document) -> Optional[str]:
    """The document's text, or None when it is not UTF-8."""
    try:
        raw = doc.read()
        return raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None


def _doc_hash(doc: Document) -> bytes:
    """The budget's order: salted, because the split is the unsalted SHA-1 of the id (`split_of`); in that
    order the first documents would all be test documents, then validation ones."""
    return hashlib.sha1(b"budget\0" + doc.id.encode("utf-8")).digest()


def select_budget(docs: Sequence[Document], max_bytes: Optional[int]) -> List[Document]:
    """A deterministic subset within `max_bytes`: documents in the order of their id's hash, each taken when
    it still fits. The hash order spreads the subset over the whole corpus (not the first folders)."""
    if max_bytes is None:
        return list(docs)
    chosen, total = set(), 0
    for doc in sorted(docs, key=_doc_hash):
        size = doc.size if doc.size is not None else len((_read_text(doc) or "").encode("utf-8"))
        if total + size <= max_bytes:
            chosen.add(doc.id)
            total += size
    return [d for d in docs if d.id in chosen]


def _texts(docs: Sequence[Document]) -> Iterator[str]:
    for doc in docs:
        yield _read_text(doc) or ""


def _split(docs: Sequence[Document], cfg: RunConfig) -> Tuple[Dict[str, List[Document]], List[str], int]:
    """Pass 1: which documents are UTF-8 text, and their splits (no document in two splits); returns the
    documents by split, the ids of those that are not UTF-8 and the number of empty ones."""
    d = cfg.data
    if not docs:
        raise DataError(f"data.max_bytes={d.max_bytes} is smaller than every document of corpus '{d.corpus}'")
    by_split: Dict[str, List[Document]] = {s: [] for s in SPLITS}
    bad: List[str] = []
    empty = 0
    for doc in docs:
        text = _read_text(doc)
        if text is None:
            bad.append(doc.id)
        elif not text:
            empty += 1
        else:
            by_split[doc.split or split_of(doc.id, d.val_fraction, d.test_fraction)].append(doc)
    total = sum(len(v) for v in by_split.values())
    if total == 0:
        what = f"none of its {len(bad)} files is UTF-8 text" if bad else "every document is empty"
        raise DataError(f"corpus '{d.corpus}' has no usable documents: {what}")
    if bad:
        print(f"lrexp data: skipped {len(bad)} document(s) of '{d.corpus}' that are not UTF-8 (first: {bad[0]})",
              file=sys.stderr)
    for split in SPLITS:
        if not by_split[split]:
            raise DataError(
                f"split '{split}' of corpus '{d.corpus}' has no documents ({total} in all); "
                "raise data.val_fraction / data.test_fraction or add documents"
            )
    return by_split, bad, empty


def _tokenizer(cfg: RunConfig, train: Sequence[Document]) -> tok_mod.Tokenizer:
    d = cfg.data
    kind = tokenizer_kind(cfg)
    if kind == "bytes":
        return tok_mod.ByteTokenizer()
    if kind == "file":
        return tok_mod.from_file(tokenizer_path(cfg))
    tok = tok_mod.train_bpe(_texts(train), len(train), d.vocab_size)
    if tok.vocab_size < d.vocab_size:
        raise DataError(
            f"the train split of corpus '{d.corpus}' fills only {tok.vocab_size} of data.vocab_size="
            f"{d.vocab_size} BPE tokens; lower data.vocab_size or use a larger corpus"
        )
    return tok


def _progress(listing: Listing, cfg: RunConfig):
    """The prepare's one progress bar (table files read, then documents tokenized, split by split), on a
    terminal only (tqdm's disable=None) and not when log.progress_bar is off."""
    from tqdm import tqdm

    return tqdm(total=len(listing.tables), desc=listing.name, disable=None if cfg.log.progress_bar else True)


def _reading(bar, name: str, table: TableFile) -> None:
    bar.set_description(f"{name}: reading {table.split or 'files'}")
    bar.update(1)


def _build(listing: Listing, cfg: RunConfig, key: str, final: Path) -> None:
    started = time.perf_counter()
    d = cfg.data
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        with _progress(listing, cfg) as bar:
            on_file = partial(_reading, bar, listing.name)
            docs = listing.documents + table_documents(listing.tables, d.text_field, tmp / _HF_SCRATCH, on_file)
            by_split, bad, empty = _split(select_budget(docs, d.max_bytes), cfg)
            bar.total = len(listing.tables) + sum(len(v) for v in by_split.values())
            bar.set_description(f"{listing.name}: {tokenizer_kind(cfg)} tokenizer")
            tok = _tokenizer(cfg, by_split["train"])
            tok.save(tmp)
            np.save(tmp / "token_bytes.npy", tok.token_bytes())
            dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
            splits = {}
            workers = prepare_workers(cfg)
            for s in SPLITS:
                bar.set_description(f"{listing.name}: tokenizing {s}")
                splits[s] = _write_split(tmp / s, by_split[s], tok, dtype, d.append_eos, listing, bar, workers)
        shutil.rmtree(tmp / _HF_SCRATCH, ignore_errors=True)  # arrow copies and lock files: scratch only
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "corpus": d.corpus,
            "name": listing.name,
            "fingerprint": listing.fingerprint,
            "tokenizer": {"kind": tok.kind, "hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                          "file": d.tokenizer_file},
            "vocab_size": tok.vocab_size,
            "dtype": dtype,
            "append_eos": d.append_eos,
            "max_bytes": d.max_bytes,
            "val_fraction": d.val_fraction,
            "test_fraction": d.test_fraction,
            "probe": listing.probe,
            "mentions": listing.mentions,
            "splits": splits,
            "documents": sum(s["documents"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "bytes": sum(s["bytes"] for s in splits.values()),
            "skipped_non_utf8": len(bad),
            "skipped_non_utf8_ids": bad[:20],
            "skipped_empty": empty,
            "sources": listing.sources,
            "notes": listing.notes,
            "prepare_seconds": round(time.perf_counter() - started, 3),
            "prepare_workers": workers,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (final / META).is_file():  # not a concurrent prepare that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_workers(cfg: RunConfig) -> int:
    """data.prepare_workers, else every CPU this process may use."""
    return cfg.data.prepare_workers or usable_cpus()


def _chunks(docs: Sequence[Document]) -> Iterator[Tuple[List[Tuple[Document, int]], List[str]]]:
    """([(document, its UTF-8 bytes)], texts) per encode_batch call, read as the encoder asks for them."""
    chunk: List[Tuple[Document, int]] = []
    texts: List[str] = []
    size = 0
    for doc, text in zip(docs, _texts(docs)):
        n = len(text.encode("utf-8"))
        if chunk and (len(chunk) == _CHUNK_DOCS or size + n > _CHUNK_BYTES):
            yield chunk, texts
            chunk, texts, size = [], [], 0
        chunk.append((doc, n))
        texts.append(text)
        size += n
    if chunk:
        yield chunk, texts


def _write_split(
    folder: Path, docs: Sequence[Document], tok: tok_mod.Tokenizer, dtype: str, append_eos: bool, listing: Listing,
    bar, workers: int,
) -> Dict:
    folder.mkdir()
    offsets = [0]
    doc_bytes: List[int] = []
    answer_file = open(folder / "answer.bin", "wb") if listing.probe else None
    mention_file = open(folder / "mention.bin", "wb") if listing.mentions else None
    try:
        with open(folder / "tokens.bin", "wb") as tokens_file:
            for chunk, encoded in tok_mod.encode_chunks(tok, _chunks(docs), workers):
                for (doc, n_bytes), ids in zip(chunk, encoded):
                    if append_eos:
                        ids = np.append(ids, tok.eos_id)  # [L]
                    tokens_file.write(ids.astype(dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                    doc_bytes.append(n_bytes)
                    if answer_file is not None:
                        answer_file.write(_answer_flags(doc.answers, len(ids)).tobytes())
                    if mention_file is not None:
                        mention_file.write(_mention_distances(doc.mentions, len(ids)).tobytes())
                bar.update(len(chunk))
    finally:
        for f in (answer_file, mention_file):
            if f is not None:
                f.close()
    lengths = np.diff(offsets)
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(folder / "doc_bytes.npy", np.asarray(doc_bytes, dtype=np.int64))
    (folder / "doc_ids.json").write_text(json.dumps([doc.id for doc in docs]))
    meta = {
        "documents": len(docs),
        "tokens": int(offsets[-1]),
        "bytes": int(sum(doc_bytes)),
        "dtype": dtype,
        "longest_document": int(lengths.max(initial=0)),
    }
    (folder / META).write_text(json.dumps(meta, indent=1))
    return meta


def _answer_flags(spans: Tuple[Tuple[int, int], ...], length: int) -> np.ndarray:
    """Probes are ASCII under the bytes tokenizer: a byte span is a token span."""
    flags = np.zeros(length, dtype=np.uint8)  # [L]
    for start, end in spans:
        flags[start:end] = 1
    return flags


def _mention_distances(mentions: Tuple[Tuple[int, int, int], ...], length: int) -> np.ndarray:
    """Per token: 0 off a name, -1 on a first mention, else the distance to the previous mention (tokens:
    mention corpora are ASCII under the bytes tokenizer)."""
    out = np.zeros(length, dtype=np.int32)  # [L]
    for start, end, distance in mentions:
        out[start:end] = distance if distance else FIRST_MENTION
    return out
