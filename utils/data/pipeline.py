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
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
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
IN_FLIGHT = 1  # chunks tokenized or waiting for the tokenizer while the next is filtered
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
    """Accounting for one input split."""

    input_rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truecased: int = 0  # kept rows with at least one message fixed
    truecased_messages: int = 0
    examples: dict[str, Any] = field(default_factory=dict)  # reason -> first dropped row (for the notebook)
    audited: Counter = field(default_factory=Counter)  # filter -> kept rows it would have dropped (or changed)
    audit_examples: dict[str, Any] = field(default_factory=dict)
    applied: set = field(default_factory=set)  # filters applied to at least one row
    audit_only: set = field(default_factory=set)  # filters only audited on at least one row

    def drop(self, reason: str, where: str, obj: Any) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, {"where": where, "row": obj})

    def audit(self, name: str, where: str, obj: Any) -> None:
        self.audited[name] += 1
        self.audit_examples.setdefault(name, {"where": where, "row": obj})

    def check(self, split: str) -> None:
        total = self.kept + sum(self.dropped.values())
        if total != self.input_rows:
            raise AssertionError(f"{split}: kept {self.kept} + dropped {total - self.kept} != input {self.input_rows}")

    def to_json(self) -> dict:
        return {
            "input_rows": self.input_rows,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "truecased": self.truecased,
            "truecased_messages": self.truecased_messages,
            "audited": dict(sorted(self.audited.items())),
        }


@dataclass
class Prepared:
    """What ``prepare`` returns: ``report.json``'s content, the accounting (with examples) per input split, and
    the token count of every kept dialogue per output split (for the histogram)."""

    report: dict
    splits: dict[str, SplitReport]
    lengths: dict[str, np.ndarray]


@dataclass(slots=True)
class _Candidate:
    """A row that passed the filters, on its way to the tokenizer."""

    dest: str
    prompt: str
    prompt_id: str
    messages: list[dict]
    where: str


class _Filters:
    """The filter chain of one run: the structure and content checks, truecasing, disclaimers, duplicate prompts.

    The duplicate check remembers 16 bytes of each prompt's SHA-256 (computed anyway for ``prompt_id``), the first
    occurrence winning (train splits are read first).
    """

    def __init__(self, options: Options):
        self.options = options
        self.phrases = load_disclaimers() if options.disclaimers is None else [p.lower() for p in options.disclaimers]
        self.seen: set[bytes] = set()

    def admit(self, report: SplitReport, target: str | None, where: str, obj: dict) -> _Candidate | None:
        """The row as a candidate for the output split ``target`` (None: by prompt hash), or None when dropped."""
        options = self.options
        messages, reason = to_messages(obj)
        reason = reason or structure_problem(messages) or content_problem(messages, options.max_chars)
        if reason:
            report.drop(reason, where, obj if reason != "too_large" else None)
            return None
        full = options.filters == "all" or (options.filters == "auto" and "messages" not in obj)
        (report.applied if full else report.audit_only).update(FILTER_CHAIN)
        fixed_messages, fixed = truecase_messages(messages)
        if full:
            messages = fixed_messages
        elif fixed:
            report.audit("truecase", where, obj)
            fixed = 0
        if disclaimer_in(fixed_messages, self.phrases):
            if full:
                report.drop("disclaimer", where, obj)
                return None
            report.audit("disclaimer", where, obj)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        digest = hashlib.sha256(prompt.encode("utf-8")).digest()
        if digest[:16] in self.seen:
            if full:
                report.drop("duplicate_prompt", where, obj)
                return None
            report.audit("duplicate_prompt", where, obj)
        self.seen.add(digest[:16])
        if fixed:
            report.truecased += 1
            report.truecased_messages += fixed
        if target is None:
            target = "test" if int.from_bytes(digest[:4], "big") % 10_000 < options.test_fraction * 10_000 else "train"
        messages = [{"content": m["content"], "role": m["role"]} for m in messages]  # null extra keys left out
        return _Candidate(target, prompt, digest.hex(), messages, where)


class _Writer:
    """Kept rows to their output split: token counts always, Arrow files when there is an output folder."""

    def __init__(self, output: OutputWriter | None):
        self.output = output
        self.lengths = {name: array("i") for name in OUTPUT_SPLITS}

    def write(self, rows: list[tuple[_Candidate, list[int]]]) -> None:
        for dest in OUTPUT_SPLITS:
            mine = [(c, ids) for c, ids in rows if c.dest == dest]
            if not mine:
                continue
            self.lengths[dest].extend(len(ids) for _, ids in mine)
            if self.output is not None:
                self.output.write(
                    dest,
                    {
                        "prompt": [c.prompt for c, _ in mine],
                        "prompt_id": [c.prompt_id for c, _ in mine],
                        "messages": [c.messages for c, _ in mine],
                        "input_ids": _int32_lists([ids for _, ids in mine]),
                        "num_tokens": [len(ids) for _, ids in mine],
                        "num_turns": [sum(m["role"] == "user" for m in c.messages) for c, _ in mine],
                    },
                )


def _int32_lists(lists: list[list[int]]):
    """An Arrow list<int32> array of ``lists``, built through numpy (faster than from the Python lists)."""
    import pyarrow as pa

    lengths = np.fromiter(map(len, lists), dtype=np.int32, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class _Tokenizer:
    """Tokenizes chunks in a worker thread (the Rust tokenizer releases the GIL, and uses every core) while the next
    ones are filtered, then applies the token bounds and hands the kept rows to the writer, in order. Up to
    ``IN_FLIGHT`` chunks wait for the tokenizer, so that it never waits for Python."""

    def __init__(self, tokenizer, options: Options, writer: _Writer, pool: ThreadPoolExecutor):
        self.tokenizer, self.options, self.writer, self.pool = tokenizer, options, writer, pool
        self.in_flight: deque[tuple[list[_Candidate], Future, SplitReport]] = deque()

    def submit(self, chunk: list[_Candidate], report: SplitReport) -> None:
        dialogues = [c.messages for c in chunk]
        job = self.pool.submit(
            tokenize_dialogues, self.tokenizer, dialogues, self.options.system_turn, self.options.tokenization
        )
        self.in_flight.append((chunk, job, report))
        while len(self.in_flight) > IN_FLIGHT:
            self._collect()

    def drain(self) -> None:
        while self.in_flight:
            self._collect()

    def _collect(self) -> None:
        chunk, job, report = self.in_flight.popleft()
        low, high = self.options.min_tokens, self.options.max_tokens
        kept = []
        for candidate, ids in zip(chunk, job.result(), strict=True):
            n = len(ids)
            if low is not None and n < low:
                report.drop("too_short", candidate.where, {"messages": candidate.messages, "num_tokens": n})
            elif high is not None and n > high:
                report.drop("too_long", candidate.where, {"messages": candidate.messages, "num_tokens": n})
            else:
                kept.append((candidate, ids))
        report.kept += len(kept)
        self.writer.write(kept)


def _prepare_split(name: str, rows: Split, single: bool, filters: _Filters, tokens: _Tokenizer, progress: bool):
    from tqdm.auto import tqdm

    report = SplitReport()
    max_rows = filters.options.max_rows
    target = None if single else SPLIT_NAMES.get(name, "train")
    total = rows.num_rows if max_rows is None or rows.num_rows is None else min(rows.num_rows, max_rows)
    pending: list[_Candidate] = []
    with tqdm(desc=name, total=total, unit=" rows", disable=not progress, mininterval=1.0) as bar:
        for line_no, obj, error in rows:
            if max_rows is not None and report.input_rows >= max_rows:
                break
            report.input_rows += 1
            bar.update()
            where = f"{name}:{line_no}"
            if error:
                report.drop(error, where, None)
                continue
            candidate = filters.admit(report, target, where, obj)
            if candidate is not None:
                pending.append(candidate)
                if len(pending) >= CHUNK_ROWS:
                    tokens.submit(pending, report)
                    pending = []
        if pending:
            tokens.submit(pending, report)
        tokens.drain()
    report.check(name)
    return report


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
    """Run the filters, truecasing, template and tokenizer over ``splits`` (from ``open_source``), streaming.

    ``options`` are the fields of ``Options``. With ``out_dir``, the kept rows are written as a ``DatasetDict``
    (``train``, and ``test`` when it has rows) with ``report.json`` into a temporary sibling, swapped into place when
    complete (``OutputError`` when no training row was kept: nothing is written). Without it, only the report.
    Output splits are ``train`` and ``test``; a source with a single split gets a deterministic ``test_fraction``
    held out by prompt hash.
    """
    opts = Options(**options)
    out = check_output(out_dir, source or None) if out_dir is not None else None
    fingerprint = source_fingerprint(source, revision) if source else None
    output = OutputWriter(out) if out is not None else None
    try:
        writer = _Writer(output)
        filters = _Filters(opts)
        ordered = sorted(splits, key=lambda s: (SPLIT_NAMES.get(s, "train") != "train", s))  # train first
        reports = {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokens = _Tokenizer(tokenizer, opts, writer, pool)
            for name in ordered:
                reports[name] = _prepare_split(name, splits[name], len(splits) == 1, filters, tokens, progress)
        lengths = {name: np.frombuffer(values, dtype=np.int32) for name, values in writer.lengths.items()}
        report = build_report(reports, lengths, opts, source, fingerprint)
        report["tokenizer"] = tokenizer_name(tokenizer)  # which one made the ids (a Hub id may fall back offline)
        if output is not None:
            if not len(lengths["train"]):
                raise OutputError(f"no training rows were kept from {source or 'the source'}; nothing written to {out}")
            output.commit(report)
    except BaseException:
        if output is not None:
            output.discard()
        raise
    return Prepared(report, reports, lengths)


def build_report(
    reports: dict[str, SplitReport], lengths: dict[str, np.ndarray], options: Options, source: str, fingerprint
) -> dict:
    """The content of ``report.json``: totals, per-split accounting and token statistics."""
    dropped: Counter = Counter()
    audited: Counter = Counter()
    for r in reports.values():
        dropped.update(r.dropped)
        audited.update(r.audited)
    return {
        "format": FORMAT,
        "source": source,
        "source_fingerprint": fingerprint,
        "input_rows": sum(r.input_rows for r in reports.values()),
        "kept": sum(r.kept for r in reports.values()),
        "dropped": dict(sorted(dropped.items())),
        "truecased": sum(r.truecased for r in reports.values()),
        "truecased_messages": sum(r.truecased_messages for r in reports.values()),
        "filters_applied": ["structure", *(f for f in FILTER_CHAIN if any(f in r.applied for r in reports.values()))],
        "filters_audited": [f for f in FILTER_CHAIN if any(f in r.audit_only for r in reports.values())],
        "audited": dict(sorted(audited.items())),
        "system_turn": options.system_turn,
        "tokenization": options.tokenization,
        "options": dataclasses.asdict(options),  # all of them: a later release prepares the folder again with these
        "splits": {name: r.to_json() for name, r in reports.items()},
        "outputs": {name: token_stats(n, options.max_length) for name, n in lengths.items()},
        "empty_splits_not_written": [name for name, n in lengths.items() if not len(n)],
    }


def prepare_source(
    source: str,
    out_dir: str | Path,
    tokenizer,
    *,
    revision: str | None = None,
    progress: bool = False,
    **options: Any,
) -> dict:
    """Open ``source`` (a file, a folder or a Hub id), prepare it streaming and write it atomically to ``out_dir``;
    return the report (``report.json``'s content).

    ``options`` are the fields of ``Options``. Raises ``SourceError`` for a source that cannot be read,
    ``OutputError`` for an ``out_dir`` this tool must not write (or when no training row was kept), ``OptionError``
    (a ValueError) for an option out of range: all before any work but the last.
    """
    opts = Options(**options)
    check_output(out_dir, source)
    with datasets_progress(progress):
        splits = open_source(source, opts.max_chars, revision)
    return prepare(splits, tokenizer, out_dir, source=source, revision=revision, progress=progress, **options).report
