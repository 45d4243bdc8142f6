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
