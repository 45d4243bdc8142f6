"""Corpora, tokenizers, token memmaps, lane schedules and the StreamDataModule.

`prepare(cfg)` turns the configured corpus into per-split token memmaps (cached, idempotent);
`StreamDataModule(cfg)` reads them as document-ordered lanes, one segment of every lane per batch.
The DataModule is imported on first use, so `lrexp data prepare` and the CLI's help do not load Lightning.
"""

from lrexp.data_modules.errors import DataError
from lrexp.data_modules.prepared import Prepared, SplitData
from lrexp.data_modules.store import prepare

__all__ = ["DataError", "Prepared", "SplitData", "StreamDataModule", "prepare"]


def __getattr__(name: str):
    if name == "StreamDataModule":
        # on first use: `lrexp data prepare` and the CLI's help must not load Lightning
        from lrexp.data_modules.datamodule import StreamDataModule

        return StreamDataModule
    raise AttributeError(f"module 'lrexp.data_modules' has no attribute '{name}'")
