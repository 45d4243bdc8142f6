"""`lrexp data prepare [--corpus NAME | --path DIR] [--name NAME] [CONFIG.yaml ...] [key=value ...]`

`--name NAME` records the corpus and the settings that decide its tokens as the data preset
`experiments/data/NAME.yaml` once it is prepared, so that `data=NAME` stands for them in every command
(docs/data.md#data-presets).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any, Dict, Tuple

from omegaconf import OmegaConf

from lrexp.commands.show_config import add_config_arguments, split_items
from lrexp.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lrexp.data_modules.corpora import CORPORA  # numpy and the corpus readers: only for `lrexp data`

    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = actions.add_parser(
        "prepare",
        help="tokenize a corpus into cached per-split token memmaps (a no-op when already prepared)",
        description="Tokenize a corpus into per-split token memmaps under data.cache_dir; idempotent.",
    )
    source = prep.add_mutually_exclusive_group()
    source.add_argument("--corpus", metavar="NAME", help=f"a named corpus: {', '.join(CORPORA)} (default: data.corpus)")
    source.add_argument(
        "--path", metavar="DIR",
        help="a folder of .txt, .jsonl[.gz] or .parquet files (its one format is detected; data.file_suffix picks "
             "files by ending instead), with train/ validation/ test/ folders for fixed splits",
    )
    prep.add_argument("--name", metavar="NAME",
                      help="record the corpus and its data.* settings as the preset experiments/data/NAME.yaml, "
                           "which data=NAME then selects in every command")
    prep.add_argument("--workers", type=int, metavar="N",
                      help="processes that tokenize, one core each (default: data.prepare_workers, else every "
                           "usable CPU); the tokens are the same for any number")
    add_config_arguments(prep)


def run(args: argparse.Namespace) -> int:
    from lrexp.config.load import load  # imports torch (the registries): not while the parser is built
    from lrexp.data_modules import prepare

    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise PresetError(f"--name '{args.name}': a data preset's name is letters, digits, '_', '-' and '.'")
    files, overrides = split_items(args.items)
    corpus = args.corpus or args.path
    if corpus:
        overrides.append(f"data.corpus={corpus}")
    if args.workers is not None:
        overrides.append(f"data.prepare_workers={args.workers}")
    cfg = load(files, overrides)
    preset = preset_of(args.name, cfg) if args.name is not None else None  # a clash fails before the work
    started = time.perf_counter()
    prepared = prepare(cfg)
    seconds = time.perf_counter() - started
    meta = prepared.meta
    tok = meta["tokenizer"]
    print(
        f"corpus {meta['corpus']}: {meta['documents']} documents, {meta['tokens']:,} tokens, {meta['bytes']:,} bytes "
        f"({meta['bytes'] / max(meta['tokens'], 1):.2f} bytes/token), {tok['kind']} vocabulary {tok['vocab_size']}"
    )
    for name, split in meta["splits"].items():
        print(f"  {name:<10} {split['documents']:>7} documents {split['tokens']:>13,} tokens {split['bytes']:>14,} bytes")
    if meta["skipped_non_utf8"]:
        print(f"  skipped {meta['skipped_non_utf8']} document(s) that are not UTF-8")
    print(f"ready in {seconds:.1f} s: {prepared.dir}")
    if preset is not None:
        write_preset(args.name, *preset)
        print(f"data preset '{args.name}': {preset[0]} (select it with data={args.name})")
    return 0


# The data.* keys that decide which tokens a corpus gives (and so its prepared cache): a preset records them all,
# so that `data=NAME` finds the same prepared data at every scale. The rest (order, workers, lanes) stay per run.
PRESET_KEYS = ("corpus", "tokenizer", "vocab_size", "tokenizer_file", "append_eos", "max_bytes", "val_fraction",
               "test_fraction", "exclude_tests", "file_suffix", "text_field")


class PresetError(UserError):
    """A data preset that cannot be recorded; one line."""


def preset_of(name: str, cfg) -> Tuple[Path, Dict[str, Any]]:
    """Where the preset `name` goes and what it holds: `data: {...}` of `cfg` (PRESET_KEYS; a corpus folder as
    an absolute path). The same settings under an existing name are fine; other settings are an error."""
    from lrexp.config.load import PRESET_DIRS  # with load(): torch, not while the parser is built
    from lrexp.data_modules.corpora import CORPORA

    data: Dict[str, Any] = {k: getattr(cfg.data, k) for k in PRESET_KEYS}
    if data["corpus"] not in CORPORA:
        data["corpus"] = str(Path(data["corpus"]).expanduser().resolve())
    if data["tokenizer_file"]:
        data["tokenizer_file"] = str(Path(data["tokenizer_file"]).expanduser().resolve())
    path = PRESET_DIRS["data"] / f"{name}.yaml"
    if path.is_file() and OmegaConf.to_container(OmegaConf.load(path)) != {"data": data}:
        raise PresetError(f"data preset '{name}' exists with other settings ({path}): remove it or choose another "
                          "--name")
    return path, data


def write_preset(name: str, path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# data preset '{name}', recorded by lrexp data prepare --name {name}; select it with "
                    f"data={name}\n" + OmegaConf.to_yaml(OmegaConf.create({"data": data})))
