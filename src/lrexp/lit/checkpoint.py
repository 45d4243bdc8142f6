"""Finding, reading and checking lrexp checkpoints.

A run's checkpoints live in `train.checkpoint_dir/<MLflow run id>/last.ckpt`. Every checkpoint carries the
run's resolved config, its vocabulary size and its run id (`LMModule.on_save_checkpoint`), so
`--resume RUN_ID_OR_CHECKPOINT` continues the same MLflow run and a checkpoint from another model config is
refused naming the keys that differ. Checkpoints are always loaded with `weights_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from lrexp.config.load import flatten
from lrexp.config.paths import project_path
from lrexp.config.schema import RunConfig
from lrexp.errors import UserError
from lrexp.lit.module import CHECKPOINT_META_KEY

LAST = "last.ckpt"
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


def locate(resume: str, checkpoint_dir: str | Path) -> Path:
    """A checkpoint file, a run's checkpoint folder, or an MLflow run id (its folder under checkpoint_dir)."""
    given = Path(resume)
    if given.is_file():
        return given
    if given.is_dir() and (given / LAST).is_file():
        return given / LAST
    by_run = project_path(checkpoint_dir) / resume / LAST
    if by_run.is_file():
        return by_run
    raise CheckpointError(f"--resume {resume}: no such checkpoint file, and no {by_run}")


def read(path: Path) -> CheckpointInfo:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle, zip and torch errors alike: one line naming the file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    meta = ckpt.get(CHECKPOINT_META_KEY) if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} is not an lrexp training checkpoint (no '{CHECKPOINT_META_KEY}' entry)")
    return CheckpointInfo(path=path, config=meta["config"], vocab_size=meta["vocab_size"], run_id=meta["run_id"])


def saved_step(path: Path) -> int:
    """The optimiser step a checkpoint was saved at (memory-mapped: no tensor is read)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


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
