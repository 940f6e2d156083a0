"""The streaming preparation: every row read, judged, truecased, templated, tokenized and written, chunk by chunk.

Every input row ends *kept* or *dropped* with exactly one reason, and ``kept + dropped == input`` is checked for
every split. Rows in the ultrachat_200k schema were already filtered and truecased by its authors: by default they
only pass the structure check, and the other filters run as an *audit* (counted, not applied). Raw UltraChat rows
get the whole chain. Memory stays flat whatever the source's size: rows go to Arrow files as they are tokenized, the
duplicate check keeps a 16-byte digest per prompt and the statistics an integer per dialogue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils import ConfigError
from utils.assets import tokenizer_name
from utils.data.filters import content_problem, disclaimer_in, load_disclaimers, structure_problem, truecase_messages
from utils.data.output import FORMAT, OutputError, OutputWriter, check_output
from utils.data.sources import MAX_CHARS, SPLIT_NAMES, Split, datasets_progress, open_source, source_fingerprint
from utils.data.stats import MAX_LENGTH, token_stats
from utils.data.template import TOKENIZATIONS, to_messages, tokenize_dialogues

TEST_FRACTION = 0.1  # for sources with a single split (raw UltraChat): ultrachat_200k holds out about 10%
CHUNK_ROWS = 500  # rows tokenized per batch (in a worker thread, while the next chunk is filtered)
FILTER_CHAIN = ("truecase", "disclaimer", "duplicate_prompt")  # after the structure check, which always applies
FILTER_MODES = ("auto", "all", "structure")
OUTPUT_SPLITS = ("train", "test")


class OptionError(ConfigError):
    """An option out of range, named as ``Options`` names it (the command line prefixes ``--``)."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name} {detail}")
        self.name, self.detail = name, detail


@dataclass
class Options:
    """What a preparation does to the rows. The defaults make the card's data."""

    filters: str = "auto"  # auto: whole chain on raw UltraChat, audit on ultrachat_200k; all; structure
    system_turn: bool = True  # the card's empty system turn before every dialogue
    tokenization: str = "card"  # card: the ids of 2023 ("▁" after every </s>); card-text; today: transformers 5.x's
    disclaimers: list[str] | None = None  # phrases; None: configs/disclaimers.txt
    min_tokens: int | None = None
    max_tokens: int | None = None
    max_length: int = MAX_LENGTH  # training length, for the statistics
    test_fraction: float = TEST_FRACTION
    max_rows: int | None = None  # per split
    max_chars: int = MAX_CHARS

    def __post_init__(self) -> None:
        for name in ("min_tokens", "max_tokens", "max_length", "max_rows", "max_chars"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise OptionError(name, f"must be positive, got {value}")
        if self.min_tokens and self.max_tokens and self.max_tokens < self.min_tokens:  # no dialogue could be kept
            minimum = f"the minimum token count ({self.min_tokens})"
            raise OptionError("max_tokens", f"must be at least {minimum}, got {self.max_tokens}")
        if not 0 <= self.test_fraction < 1:
            raise OptionError("test_fraction", f"must be in [0, 1), got {self.test_fraction}")
        if self.tokenization not in TOKENIZATIONS:
            raise OptionError("tokenization", f"must be one of {', '.join(TOKENIZATIONS)}, got {self.tokenization!r}")
        if self.filters not in FILTER_MODES:
            raise OptionError("filters", f"must be one of {', '.join(FILTER_MODES)}, got {self.filters!r}")


@dataclass
class SplitReport:
    """Accounting for one input split, with the first row of each drop reason and audit finding (for the notebook)."""

    input_rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truecased: int = 0  # kept rows with at least one message fixed
    truecased_messages: int = 0
    audited: Counter = field(default_factory=Counter)  # filter -> kept rows it would have dropped (or changed)
    examples: dict[str, Any] = field(default_factory=dict)  # reason -> {"where": "split:line", "row": ...}
    audit_examples: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, where: str, obj: Any, applied: bool = True) -> bool:
        """Count the row dropped for ``reason``, or, when that filter is only audited, as kept but caught by it."""
        counts, examples = (self.dropped, self.examples) if applied else (self.audited, self.audit_examples)
        counts[reason] += 1
        examples.setdefault(reason, {"where": where, "row": obj})
        return applied

    def to_json(self) -> dict:
        keys = ("input_rows", "kept", "dropped", "truecased", "truecased_messages", "audited")
        values = {key: getattr(self, key) for key in keys}
        return {k: dict(sorted(v.items())) if isinstance(v, Counter) else v for k, v in values.items()}


@dataclass
class Prepared:
    """What ``prepare`` returns: ``report.json``'s content, the accounting (with examples) per input split, and
    the token count of every kept dialogue per output split (for the histogram)."""

    report: dict
    splits: dict[str, SplitReport]
    lengths: dict[str, np.ndarray]


class _Run:
    """One preparation: the filter chain, then the tokenizer in a worker thread (the Rust tokenizer releases the GIL
    and uses every core) on one chunk while the next is filtered, then the token bounds and the writer.

    The duplicate check remembers 16 bytes of each prompt's SHA-256 (computed anyway for ``prompt_id``), the first
    occurrence winning (train splits are read first).
    """

    def __init__(self, tokenizer, options: Options, output: OutputWriter | None, pool: ThreadPoolExecutor):
        self.tokenizer, self.options, self.output, self.pool = tokenizer, options, output, pool
        self.phrases = load_disclaimers() if options.disclaimers is None else [p.lower() for p in options.disclaimers]
        self.seen: set[bytes] = set()
        self.chain_applied = self.chain_audited = False  # on at least one row
        self.lengths = {name: array("i") for name in OUTPUT_SPLITS}
        self.job = None  # (chunk, its tokenization's future, its split's report)

    def split(self, name: str, rows: Split, target: str | None, progress: bool) -> SplitReport:
        """Read, judge and write one input split into ``target`` (None: by prompt hash)."""
        from tqdm.auto import tqdm

        report, chunk, max_rows = SplitReport(), [], self.options.max_rows
        total = rows.num_rows if max_rows is None or rows.num_rows is None else min(rows.num_rows, max_rows)
        with tqdm(desc=name, total=total, unit=" rows", disable=not progress, mininterval=1.0) as bar:
            for line_no, obj, error in itertools.islice(rows, max_rows):
                report.input_rows += 1
                bar.update()
                where = f"{name}:{line_no}"
                if error:
                    report.drop(error, where, None)
                elif (candidate := self.admit(report, target, where, obj)) is not None:
                    chunk.append(candidate)
                    if len(chunk) >= CHUNK_ROWS:
                        self.tokenize(chunk, report)
                        chunk = []
            if chunk:
                self.tokenize(chunk, report)
            self.collect()
        dropped = sum(report.dropped.values())
        if report.kept + dropped != report.input_rows:
            raise AssertionError(f"{name}: kept {report.kept} + dropped {dropped} != input {report.input_rows}")
        return report

    def admit(self, report: SplitReport, target: str | None, where: str, obj: dict) -> tuple | None:
        """``(output split, where, row)`` for a row that passes the filters, or None when dropped."""
        options = self.options
        messages, reason = to_messages(obj)
        reason = reason or structure_problem(messages) or content_problem(messages, options.max_chars)
        if reason:
            report.drop(reason, where, obj if reason != "too_large" else None)
            return None
        full = options.filters == "all" or (options.filters == "auto" and "messages" not in obj)
        self.chain_applied |= full
        self.chain_audited |= not full
        fixed_messages, fixed = truecase_messages(messages)
        if full:
            messages = fixed_messages
        elif fixed:
            report.drop("truecase", where, obj, applied=False)
        if disclaimer_in(fixed_messages, self.phrases) and report.drop("disclaimer", where, obj, full):
            return None
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        digest = hashlib.sha256(prompt.encode("utf-8")).digest()
        if digest[:16] in self.seen and report.drop("duplicate_prompt", where, obj, full):
            return None
        self.seen.add(digest[:16])
        if full and fixed:
            report.truecased += 1
            report.truecased_messages += fixed
        if target is None:
            target = "test" if int.from_bytes(digest[:4], "big") % 10_000 < options.test_fraction * 10_000 else "train"
        messages = [{"content": m["content"], "role": m["role"]} for m in messages]  # null extra keys left out
        turns = sum(m["role"] == "user" for m in messages)
        return target, where, {"prompt": prompt, "prompt_id": digest.hex(), "messages": messages, "num_turns": turns}

    def tokenize(self, chunk: list[tuple], report: SplitReport) -> None:
        """Queue ``chunk`` for the tokenizer, then collect the chunk before it: the tokenizer never waits for Python."""
        dialogues = [row["messages"] for _, _, row in chunk]
        options = self.options
        job = self.pool.submit(tokenize_dialogues, self.tokenizer, dialogues, options.system_turn, options.tokenization)
        self.collect()
        self.job = chunk, job, report

    def collect(self) -> None:
        """Apply the token bounds to the queued chunk and write its kept rows to their output splits."""
        if self.job is None:
            return
        (chunk, job, report), self.job = self.job, None
        low, high = self.options.min_tokens, self.options.max_tokens
        kept = []
        for (dest, where, row), ids in zip(chunk, job.result(), strict=True):
            reason = "too_short" if low and len(ids) < low else "too_long" if high and len(ids) > high else None
            if reason:
                report.drop(reason, where, {"messages": row["messages"], "num_tokens": len(ids)})
            else:
                kept.append((dest, row, ids))
        report.kept += len(kept)
        for dest in OUTPUT_SPLITS:
            rows, tokens = [row for d, row, _ in kept if d == dest], [ids for d, _, ids in kept if d == dest]
            self.lengths[dest].extend(map(len, tokens))
            if rows and self.output is not None:
                import pyarrow as pa

                columns = {key: [row[key] for row in rows] for key in rows[0]}
                input_ids = pa.array(tokens, type=pa.list_(pa.int32()))  # faster than datasets' typing of the lists
                self.output.write(dest, {**columns, "input_ids": input_ids, "num_tokens": list(map(len, tokens))})

    def report(self, reports: dict[str, SplitReport], lengths: dict[str, np.ndarray], source: str, fingerprint) -> dict:
        """The content of ``report.json``: totals, per-split accounting and token statistics."""
        options, rs = self.options, reports.values()
        return {
            "format": FORMAT,
            "source": source,
            "source_fingerprint": fingerprint,
            "input_rows": sum(r.input_rows for r in rs),
            "kept": sum(r.kept for r in rs),
            "dropped": dict(sorted(sum((r.dropped for r in rs), Counter()).items())),
            "truecased": sum(r.truecased for r in rs),
            "truecased_messages": sum(r.truecased_messages for r in rs),
            "filters_applied": ["structure", *(FILTER_CHAIN if self.chain_applied else ())],
            "filters_audited": list(FILTER_CHAIN if self.chain_audited else ()),
            "audited": dict(sorted(sum((r.audited for r in rs), Counter()).items())),
            "system_turn": options.system_turn,
            "tokenization": options.tokenization,
            "options": dataclasses.asdict(options),  # all of them: a later release prepares the folder again with these
            "splits": {name: r.to_json() for name, r in reports.items()},
            "outputs": {name: token_stats(n, options.max_length) for name, n in lengths.items()},
            "empty_splits_not_written": [name for name, n in lengths.items() if not len(n)],
            "tokenizer": tokenizer_name(self.tokenizer),  # which one made the ids (a Hub id may fall back offline)
        }


def prepare(
    splits: dict[str, Split],
    tokenizer,
    out_dir: str | Path | None = None,
    *,
    source: str = "",
    revision: str | None = None,
    progress: bool = False,
    **options: Any,
) -> Prepared:
    """Run the filters, truecasing, template and tokenizer over ``splits`` (from ``open_source``) with ``options``
    (``Options``' fields). With ``out_dir``, the kept rows go to ``train`` and ``test`` (a single-split source holds
    out ``test_fraction`` by prompt hash), swapped into place when complete; OutputError if no training row was kept."""
    opts = Options(**options)
    out = check_output(out_dir, source or None) if out_dir is not None else None
    fingerprint = source_fingerprint(source, revision) if source else None
    output = OutputWriter(out) if out is not None else None
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            run = _Run(tokenizer, opts, output, pool)
            reports = {}
            for name in sorted(splits, key=lambda s: (SPLIT_NAMES.get(s, "train") != "train", s)):  # train first
                target = None if len(splits) == 1 else SPLIT_NAMES.get(name, "train")
                reports[name] = run.split(name, splits[name], target, progress)
        lengths = {name: np.frombuffer(values, dtype=np.int32) for name, values in run.lengths.items()}
        report = run.report(reports, lengths, source, fingerprint)
        if output is not None:
            if not len(lengths["train"]):
                raise OutputError(f"no training rows were kept from {source or 'the source'}; nothing written to {out}")
            output.commit(report)
    except BaseException:
        if output is not None:
            output.discard()
        raise
    return Prepared(report, reports, lengths)


def prepare_source(
    source: str,
    out_dir: str | Path,
    tokenizer,
    *,
    revision: str | None = None,
    progress: bool = False,
    **options: Any,
) -> dict:
    """Open ``source`` (a file, a folder or a Hub id), prepare it into ``out_dir``; return the report. OptionError,
    OutputError and SourceError come before any work (but OutputError when no training row was kept)."""
    max_chars = Options(**options).max_chars
    check_output(out_dir, source)
    with datasets_progress(progress):
        splits = open_source(source, max_chars, revision)
    return prepare(splits, tokenizer, out_dir, source=source, revision=revision, progress=progress, **options).report
