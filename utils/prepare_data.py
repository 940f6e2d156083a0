"""Notebook 01 as a command: filter UltraChat, truecase it, render the Zephyr template, tokenize, count, save.

    python -m utils.prepare_data --source data/sample/ultrachat_200k --out data/processed/ultrachat
    python -m utils.prepare_data --source HuggingFaceH4/ultrachat_200k --out data/processed/ultrachat_200k

Every row is kept or dropped with one reason (``utils.data.pipeline``). The output, a ``datasets.DatasetDict`` with
``report.json``, replaces ``--out`` only once complete, and only a folder this tool wrote (``utils.data.output``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from utils.data.filters import load_disclaimers
from utils.data.output import check_output
from utils.data.pipeline import FILTER_MODES, TEST_FRACTION, OptionError, Options, prepare
from utils.data.sources import MAX_CHARS, datasets_progress, open_source
from utils.data.stats import MAX_LENGTH
from utils.data.template import TOKENIZATIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.prepare_data", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--source",
        default="data/sample/ultrachat_200k",
        help="folder or file of JSON Lines/JSON/Parquet (either UltraChat schema), or a Hub dataset id",
    )
    add("--revision", default=None, help="Hub dataset commit or tag to load (default: main)")
    add(
        "--out",
        default="data/processed/ultrachat",
        help="output folder: new, empty, or written by this tool before (then replaced when complete)",
    )
    add("--tokenizer", default=None, help="Hub id of the tokenizer; default: the embedded Mistral-7B tokenizer")
    add(
        "--filters",
        default="auto",
        choices=FILTER_MODES,
        help="auto: the whole chain on raw UltraChat, an audit on ultrachat_200k rows; all: apply every filter to "
        "every row; structure: audit the chain everywhere",
    )
    add(
        "--no-system-turn",
        dest="system_turn",
        action="store_false",
        help="do not insert the empty system turn the card's recipe put before every dialogue",
    )
    add(
        "--tokenization",
        default="card",
        choices=TOKENIZATIONS,
        help="card: the card's ids (the 2023 tokenizer put '▁', id 28705, after every </s>, and made </s>, <s>, <unk> "
        "typed in a message control tokens); card-text: the same, such text kept as text; today: transformers 5.x's",
    )
    add("--disclaimers", default=None, help="file of disclaimer phrases, one per line")
    add("--min-tokens", type=int, default=None, help="drop dialogues shorter than this")
    add("--max-tokens", type=int, default=None, help="drop dialogues longer than this")
    add("--max-chars", type=int, default=MAX_CHARS, help="drop rows with more characters (too_large)")
    add("--max-length", type=int, default=MAX_LENGTH, help="training length for the statistics")
    add("--test-fraction", type=float, default=TEST_FRACTION, help="held-out share for single-split sources")
    add("--max-rows", type=int, default=None, help="read at most this many rows per split")
    add("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if f.name != "disclaimers"}
    try:  # every mistake a user can make is one line here, before the tokenizer loads or a row is read
        Options(**options)
        check_output(args.out, args.source)
        if args.disclaimers:
            options["disclaimers"] = read_disclaimers(args.disclaimers)
        with datasets_progress(not args.no_progress):
            splits = open_source(args.source, args.max_chars, args.revision)
        from utils.assets import load_tokenizer

        run = dict(source=args.source, revision=args.revision, progress=not args.no_progress, **options)
        report = prepare(splits, load_tokenizer(args.tokenizer), args.out, **run).report
    except OptionError as exc:
        print(f"error: --{exc.name.replace('_', '-')} {exc.detail}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # ValueError: ConfigError, whose kinds SourceError and OutputError are
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report, args.out)
    return 0


def read_disclaimers(path: str) -> list[str]:
    """The ``--disclaimers`` phrases, or OptionError in one line for a file that cannot be read as text."""
    try:
        return load_disclaimers(path)
    except OSError as exc:
        raise OptionError("disclaimers", f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OptionError("disclaimers", str(exc)) from None


def print_report(report: dict, out: str) -> None:
    """The summary the command prints: totals, filters, drop and audit counts, and each written split."""
    print(
        f"{report['input_rows']} rows read, {report['kept']} kept, {sum(report['dropped'].values())} dropped, "
        f"{report['truecased']} truecased -> {out}"
    )
    print(
        f"  filters applied: {', '.join(report['filters_applied'])}; audited only: "
        f"{', '.join(report['filters_audited']) or 'none'}; token ids: {report['tokenization']}"
    )
    for reason, n in report["dropped"].items():
        print(f"  dropped {n:>6}  {reason}")
    for name, n in report["audited"].items():
        print(f"  audited {n:>6}  {name} (kept: ultrachat_200k's authors already filtered it; --filters all drops)")
    for name, stats in report["outputs"].items():
        if stats["dialogues"]:
            print(
                f"  {name}: {stats['dialogues']} dialogues, {stats['total_tokens']:,} tokens, "
                f"{stats['packed_sequences_bfd']} packed sequences of {stats['max_length']}, "
                f"{stats['tokens_truncated_by_bfd']:,} tokens cut by bfd"
            )
    for name in report["empty_splits_not_written"]:
        print(f"  {name}: no rows, so no {name} split was written")


if __name__ == "__main__":
    sys.exit(main())
