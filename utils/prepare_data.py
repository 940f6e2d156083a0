"""Notebook 01 as a command: filter UltraChat, truecase it, render the Zephyr template, tokenize, count, save.

    python -m utils.prepare_data --source data/sample/ultrachat_200k --out data/processed/ultrachat
    python -m utils.prepare_data --source HuggingFaceH4/ultrachat_200k --out data/processed/ultrachat_200k

Every row is kept or dropped with one reason (``utils.data.pipeline``). The output, a ``datasets.DatasetDict`` with
``report.json``, replaces ``--out`` only once complete, and only a folder this tool wrote (``utils.data.output``).
"""

from __future__ import annotations

import argparse
import sys

from utils.data.pipeline import FILTER_MODES, OptionError, prepare_source
from utils.data.template import TOKENIZATIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's arguments; an option of ``Options`` not given is left out, for its default there."""
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(
        "python -m utils.prepare_data", description=description, argument_default=argparse.SUPPRESS
    )
    parser.set_defaults(source="data/sample/ultrachat_200k", out="data/processed/ultrachat", progress=True)
    add = parser.add_argument
    add("--source", help="folder or file of JSON Lines/JSON/Parquet (either UltraChat schema), or a Hub dataset id")
    add("--revision", default=None, help="Hub dataset commit or tag to load (default: main)")
    add("--out", help="output folder: new, empty, or written by this tool before (then replaced when complete)")
    add("--tokenizer", default=None, help="Hub id of the tokenizer; default: the embedded Mistral-7B tokenizer")
    add(
        "--filters",
        choices=FILTER_MODES,
        help="auto: the whole chain on raw UltraChat, an audit on ultrachat_200k rows; all: apply every filter to "
        "every row; structure: audit the chain everywhere",
    )
    no_system_turn = "do not insert the empty system turn the card's recipe put before every dialogue"
    add("--no-system-turn", dest="system_turn", action="store_false", help=no_system_turn)
    add(
        "--tokenization",
        choices=TOKENIZATIONS,
        help="card: the card's ids (the 2023 tokenizer put '▁', id 28705, after every </s>, and made </s>, <s>, <unk> "
        "typed in a message control tokens); card-text: the same, such text kept as text; today: transformers 5.x's",
    )
    add("--disclaimers", help="file of disclaimer phrases, one per line")
    add("--min-tokens", type=int, help="drop dialogues shorter than this")
    add("--max-tokens", type=int, help="drop dialogues longer than this")
    add("--max-chars", type=int, help="drop rows with more characters (too_large; default 200000)")
    add("--max-length", type=int, help="training length for the statistics (default 2048)")
    add("--test-fraction", type=float, help="held-out share for single-split sources (default 0.1)")
    add("--max-rows", type=int, help="read at most this many rows per split")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = vars(parse_args(argv))
    out = options.pop("out")
    try:  # every mistake a user can make is one line, before the tokenizer loads or a row is read
        report = prepare_source(out_dir=out, **options)
    except OptionError as exc:
        name, detail = str(exc).split(" ", 1)
        print(f"error: --{name.replace('_', '-')} {detail}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # ValueError: ConfigError, whose kinds SourceError and OutputError are
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report, out)
    return 0


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
