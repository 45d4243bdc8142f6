"""`check_run(cfg)`: everything a run checks before its long work, in one place, so that `show-config`,
`grid --dry-run` (every cell) and `train` agree, and a config that passes here starts.

`config.load` has checked the schema and the cross-field rules. Here: the corpus and its tokenizer (the
corpus exists and its files have one readable format, a probe has the bytes tokenizer, a tokenizer file
loads), then the variant's layer specs and the model itself, built on the meta device (no memory, no
time), against the segment length. Reading and tokenizing the corpus is left to `prepare`.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch

from lrexp.config.errors import ConfigError
from lrexp.config.schema import RunConfig
from lrexp.data_modules import corpora, store
from lrexp.model.lm import build_model


def check_run(cfg: RunConfig) -> None:
    """Raise a UserError with one line naming the first problem a run of `cfg` would meet."""
    store.check_config(cfg)
    corpora.check_source(cfg)
    _check_model(cfg, store.vocab_size(cfg))
    _check_compile(cfg)


def short_run_note(cfg: RunConfig) -> Optional[str]:
    """One line when the run is shorter than what it would show (docs/configuration.md#short-runs): below its
    validation cadence, its warm-up or twice its logging cadence; says what was scaled down and to what."""
    t, m = cfg.train, cfg.train.max_steps
    kept = []
    if t.val_every > m:
        kept.append(f"train.val_every ({t.val_every}): no validation curve")
    if 2 * cfg.log.every_n_steps > m:
        kept.append(f"twice log.every_n_steps ({cfg.log.every_n_steps}): at most one point of train/loss and perf/*")
    if cfg.optim.warmup_steps > m:
        kept.append(f"optim.warmup_steps ({cfg.optim.warmup_steps}): the learning rate never reaches its peak")
    if not cfg.derived.adapted and not kept:
        return None
    parts = []
    if cfg.derived.adapted:
        now = ", ".join(f"{key} {was} -> {new}" for key, (was, new) in cfg.derived.adapted.items())
        parts.append(f"{now} (not set, so scaled to the run; set them to choose)")
    if kept:
        parts.append("below " + "; ".join(kept))
    return f"short run, train.max_steps={m}: " + "; ".join(parts)


def _check_compile(cfg: RunConfig) -> None:
    """torch.compile's CPU code is C++ built by the compiler inductor looks for: $CXX, else g++ (clang++ on
    macOS). Without one the first step would fail deep in a traceback."""
    if not cfg.train.compile:
        return
    on_cpu = cfg.train.accelerator == "cpu" or (cfg.train.accelerator == "auto" and not torch.cuda.is_available())
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if on_cpu and shutil.which(compiler) is None:
        raise ConfigError(f"'train.compile=true' on a CPU needs the C++ compiler '{compiler}' ($CXX), which is not "
                          "found: install one or set train.compile=false")


def _check_model(cfg: RunConfig, vocab_size: int) -> None:
    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    n = cfg.derived.segment_len
    if n % model.segment_multiple:
        raise ConfigError(
            f"the segment length ({n}) must be a multiple of every layer's window: variant "
            f"'{cfg.model.variant}' needs a multiple of {model.segment_multiple} (set model.segment_len)"
        )
