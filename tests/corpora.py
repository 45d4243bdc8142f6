"""Tiny text corpora the integration tests build for themselves (nothing is downloaded)."""

from pathlib import Path
from typing import Sequence


def word_documents(folder: Path, sentence: str, lengths: Sequence[int], name: str = "doc{i}.txt",
                   end: str = "\n") -> Path:
    """Document i is lengths[i] words of `sentence`, word j being word (i * j) mod len(sentence): texts that
    differ per document and never change. File names (`name`) are the document ids, so they fix the splits."""
    folder.mkdir(parents=True, exist_ok=True)
    words = sentence.split()
    for i, n in enumerate(lengths):
        (folder / name.format(i=i)).write_text(" ".join(words[(i * j) % len(words)] for j in range(n)) + end)
    return folder
