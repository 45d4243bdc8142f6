"""`lrexp data prepare [--corpus NAME | --path DIR] [CONFIG.yaml ...] [key=value ...]`"""

from __future__ import annotations

import argparse
import time

from lrexp.commands.show_config import add_config_arguments, split_items


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
    prep.add_argument("--workers", type=int, metavar="N",
                      help="processes that tokenize, one core each (default: data.prepare_workers, else every "
                           "usable CPU); the tokens are the same for any number")
    add_config_arguments(prep)


def run(args: argparse.Namespace) -> int:
    from lrexp.config.load import load  # imports torch (the registries): not while the parser is built
    from lrexp.data_modules import prepare

    files, overrides = split_items(args.items)
    corpus = args.corpus or args.path
    if corpus:
        overrides.append(f"data.corpus={corpus}")
    if args.workers is not None:
        overrides.append(f"data.prepare_workers={args.workers}")
    cfg = load(files, overrides)
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
    return 0
