"""Finding, reading and checking lrexp checkpoints.

A run's checkpoints live in `train.checkpoint_dir/<MLflow run id>/`: `last.ckpt`, and the
`train.keep_checkpoints - 1` saves before it as `last-1.ckpt`, `last-2.ckpt`, ... (lit/saving.py writes them
atomically). Every checkpoint carries the run's resolved config, its vocabulary size and its run id
(`LMModule.on_save_checkpoint`), so `--resume RUN_ID_OR_CHECKPOINT` continues the same MLflow run and a
checkpoint from another model config is refused naming the keys that differ. A run id or folder resumes from
the newest readable checkpoint in it, saying in one line which one it skipped and why
(docs/grids.md#faults-and-what-survives-them).

`load` is the one reader: always `weights_only=True`; a file that is no checkpoint, one cut short and one
that only a code-running unpickler could load are each named as such.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from lrexp.config.load import flatten
from lrexp.config.paths import project_path
from lrexp.config.schema import RunConfig
from lrexp.errors import UserError
from lrexp.lit.module import CHECKPOINT_META_KEY

LAST = "last.ckpt"
_EARLIER = re.compile(r"last-(\d+)\.ckpt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
# Keys that define the parameters, the carried state or the token ids: a checkpoint must agree on all.
_MODEL_KEYS = ("model.",)
_DATA_KEYS = ("data.tokenizer", "data.vocab_size", "data.tokenizer_file")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible config."""


@dataclass
class CheckpointInfo:
    path: Path
    config: Dict[str, Any]  # resolved config of the run that wrote it
    vocab_size: int
    run_id: Optional[str]


def run_dir(cfg: RunConfig, run_id: str) -> Path:
    return project_path(cfg.train.checkpoint_dir) / run_id


def earlier(i: int) -> str:
    """The name of the checkpoint saved `i` saves before `last.ckpt`."""
    return f"last-{i}.ckpt"


def saved(folder: Path) -> List[Path]:
    """The checkpoints in a run's folder, newest first: last.ckpt, last-1.ckpt, ..."""
    older = sorted((int(m.group(1)), p) for p in folder.glob("last-*.ckpt") if (m := _EARLIER.fullmatch(p.name)))
    return [p for p in [folder / LAST, *(p for _, p in older)] if p.is_file()]


@dataclass
class Newest:
    """The newest readable checkpoint of a folder (None when none reads), and why each newer one was skipped."""

    path: Optional[Path]
    step: Optional[int]
    skipped: List[str] = field(default_factory=list)  # one "name (reason)" per skipped file, newest first

    def note(self) -> str:
        return f"resuming from {self.path.name} (step {self.step}): skipped {'; '.join(self.skipped)}"


def newest(folder: Path) -> Newest:
    skipped = []
    for path in saved(folder):
        try:
            return Newest(path, int(load(path)["global_step"]), skipped)
        except CheckpointError as exc:
            skipped.append(f"{path.name} ({str(exc).replace(f'{path} ', '', 1)})")
        except (KeyError, TypeError):
            skipped.append(f"{path.name} (not a training checkpoint: no global_step)")
    return Newest(None, None, skipped)


def locate(resume: str, checkpoint_dir: str | Path, say: Optional[Callable[[str], None]] = None) -> Path:
    """A checkpoint file, a run's checkpoint folder, or an MLflow run id (its folder under checkpoint_dir);
    of a folder, its newest readable checkpoint (`say` gets the line naming any newer one skipped)."""
    given = Path(resume)
    if given.is_file():
        return given
    folder = given if given.is_dir() else project_path(checkpoint_dir) / resume
    found = newest(folder)
    if found.path is None:
        raise CheckpointError(f"--resume {resume}: no readable checkpoint in {folder} ({'; '.join(found.skipped)})"
                              if found.skipped else f"--resume {resume}: no such checkpoint file, and no {folder / LAST}")
    if found.skipped and say is not None:
        say(found.note())
    return found.path


def load(path: Path, mmap: bool = True) -> Any:
    """`torch.load(path)` weights-only (memory-mapped unless `mmap` is False), every failure one line that
    says what the file is: not a checkpoint, cut short, refused as unsafe, or unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (a file torch.save wrote starts otherwise)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is cut short: its end is missing (a save that was interrupted or ran "
                              f"out of space)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is refused: it holds objects other than tensors and plain data, and "
                              f"loading it could run code") from None
    except Exception as exc:  # zip and torch errors alike: one line naming the file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def read(path: Path) -> CheckpointInfo:
    ckpt = load(path)
    meta = ckpt.get(CHECKPOINT_META_KEY) if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} is not an lrexp training checkpoint (no '{CHECKPOINT_META_KEY}' entry)")
    return CheckpointInfo(path=path, config=meta["config"], vocab_size=meta["vocab_size"], run_id=meta["run_id"])


def saved_step(path: Path) -> int:
    """The optimiser step a checkpoint was saved at (memory-mapped: no tensor is read)."""
    return int(load(path)["global_step"])


def check_compatible(cfg: RunConfig, info: CheckpointInfo, vocab_size: Optional[int] = None) -> None:
    """Raise naming every model/tokenizer key on which `cfg` and the checkpoint's config differ."""
    ours, theirs = flatten(cfg), flatten(info.config)
    keys = sorted(
        k for k in set(ours) | set(theirs)
        if k.startswith(_MODEL_KEYS) or k in _DATA_KEYS
    )
    diffs = [f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys if ours.get(k) != theirs.get(k)]
    if vocab_size is not None and vocab_size != info.vocab_size:
        diffs.append(f"vocabulary size={info.vocab_size} there, {vocab_size} here")
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise CheckpointError(f"checkpoint {info.path} is from another model config: {shown}")
    # Lightning counts micro-batches (data cursor, accumulation phase): another grouping would misplace both
    there = theirs.get("train.lane_groups", 1)
    if ours["train.lane_groups"] != there:
        raise CheckpointError(f"checkpoint {info.path} was trained with train.lane_groups={there}, this run has "
                              f"{ours['train.lane_groups']}: resume with the same lane groups")


def resume_config_dict(info: CheckpointInfo) -> Dict[str, Any]:
    """The checkpoint's config as user-level YAML data (without the computed `derived` section)."""
    return {k: v for k, v in info.config.items() if k != "derived"}
