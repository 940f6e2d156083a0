"""The streaming preparation: every row read, judged, truecased, templated, tokenized and written, chunk by chunk.

Every input row ends *kept* or *dropped* with exactly one reason (``kept + dropped == input``, checked per split).
ultrachat_200k rows were filtered and truecased by its authors: by default they only pass the structure check and the
other filters are audited (counted, not applied); raw UltraChat rows get the whole chain. Memory stays flat: rows go
to Arrow files as they are tokenized; a 16-byte digest per prompt and a length per dialogue are all that stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from array import array
from collections import Counter
from collections.abc import Iterator
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

CHUNK_ROWS = 500  # rows tokenized per batch (in a worker thread, while the next chunk is filtered)
FILTER_CHAIN = ("truecase", "disclaimer", "duplicate_prompt")  # after the structure check, which always applies
FILTER_MODES = ("auto", "all", "structure")
OUTPUT_SPLITS = ("train", "test")


class OptionError(ConfigError):
    """An option out of range: the message starts with its name as ``Options`` names it (the command line's: ``--``)."""


@dataclass
class Options:
    """What a preparation does to the rows. The defaults make the card's data."""

    filters: str = "auto"  # auto: whole chain on raw UltraChat, audit on ultrachat_200k; all; structure
    system_turn: bool = True  # the card's empty system turn before every dialogue
    tokenization: str = "card"  # TOKENIZATIONS
    disclaimers: list[str] | str | None = None  # phrases, or a file of them (read here); None: configs/disclaimers.txt
    min_tokens: int | None = None
    max_tokens: int | None = None
    max_length: int = MAX_LENGTH  # training length, for the statistics
    test_fraction: float = 0.1  # held out of a single-split source (raw UltraChat), as ultrachat_200k holds out ~10%
    max_rows: int | None = None  # per split
    max_chars: int = MAX_CHARS

    def __post_init__(self) -> None:
        for name in ("min_tokens", "max_tokens", "max_length", "max_rows", "max_chars"):
            if (value := getattr(self, name)) is not None and value <= 0:
                raise OptionError(f"{name} must be positive, got {value}")
        if self.min_tokens and self.max_tokens and self.max_tokens < self.min_tokens:  # no dialogue could be kept
            minimum = f"the minimum token count ({self.min_tokens})"
            raise OptionError(f"max_tokens must be at least {minimum}, got {self.max_tokens}")
        if not 0 <= self.test_fraction < 1:
            raise OptionError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        for name, allowed in (("tokenization", TOKENIZATIONS), ("filters", FILTER_MODES)):
            if getattr(self, name) not in allowed:
                raise OptionError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if isinstance(self.disclaimers, str):
            try:
                self.disclaimers = load_disclaimers(self.disclaimers)
            except ValueError as exc:
                raise OptionError(f"disclaimers {exc}") from None


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
        counts = {k: dict(sorted(v.items())) if isinstance(v, Counter) else v for k, v in vars(self).items()}
        return {k: v for k, v in counts.items() if not k.endswith("examples")}


@dataclass
class Prepared:
    """``report.json``'s content, the accounting per input split, the token count of each kept dialogue per output."""

    report: dict
    splits: dict[str, SplitReport]
    lengths: dict[str, np.ndarray]


class _Run:
    """One preparation: the filter chain, then the tokenizer in a worker thread (the Rust tokenizer releases the GIL
    and uses every core) on one chunk while the next is filtered, then the token bounds and the writer."""

    def __init__(self, tokenizer, options: Options, output: OutputWriter | None):
        self.tokenizer, self.options, self.output = tokenizer, options, output
        self.phrases = load_disclaimers() if options.disclaimers is None else [p.lower() for p in options.disclaimers]
        self.seen: set[bytes] = set()  # 16 bytes of each prompt's SHA-256: the first occurrence wins
        self.chain: set[str] = set()  # "applied", "audited": how the chain ran, on at least one row
        self.lengths = {name: array("i") for name in OUTPUT_SPLITS}

    def split(self, name: str, rows: Split, target: str | None, pool: ThreadPoolExecutor, progress: bool):
        """Read, judge and write one input split into ``target`` (None: by prompt hash)."""
        from tqdm.auto import tqdm

        report, max_rows = SplitReport(), self.options.max_rows
        total = rows.num_rows if max_rows is None or rows.num_rows is None else min(rows.num_rows, max_rows)
        with tqdm(desc=name, total=total, unit=" rows", disable=not progress, mininterval=1.0) as bar:
            admitted = self.admitted(report, name, bar.update, itertools.islice(rows, max_rows), target)
            chunks = iter(lambda: list(itertools.islice(admitted, CHUNK_ROWS)), [])
            jobs = ((chunk, pool.submit(self.tokenize, chunk)) for chunk in chunks)
            for job, _ in itertools.pairwise(itertools.chain(jobs, [None])):  # the next chunk is tokenized meanwhile
                self.collect(report, *job)
        dropped = sum(report.dropped.values())
        if report.kept + dropped != report.input_rows:
            raise AssertionError(f"{name}: kept {report.kept} + dropped {dropped} != input {report.input_rows}")
        return report

    def admitted(self, report: SplitReport, name: str, tick, rows, target: str | None) -> Iterator[tuple]:
        """``(output split, where, row)`` for each row that passes the filters; the others are counted dropped."""
        options = self.options
        for line_no, obj, error in rows:
            report.input_rows += 1
            tick()
            where = f"{name}:{line_no}"
            messages, reason = (None, error) if error else to_messages(obj)
            reason = reason or structure_problem(messages) or content_problem(messages, options.max_chars)
            if reason:
                report.drop(reason, where, obj if reason != "too_large" else None)
                continue
            full = options.filters == "all" or (options.filters == "auto" and "messages" not in obj)
            self.chain.add("applied" if full else "audited")
            fixed_messages, fixed = truecase_messages(messages)
            if full:
                messages = fixed_messages
            elif fixed:
                report.drop("truecase", where, obj, applied=False)
            if disclaimer_in(fixed_messages, self.phrases) and report.drop("disclaimer", where, obj, full):
                continue
            prompt = next(m["content"] for m in messages if m["role"] == "user")
            digest = hashlib.sha256(prompt.encode("utf-8")).digest()
            if digest[:16] in self.seen and report.drop("duplicate_prompt", where, obj, full):
                continue
            self.seen.add(digest[:16])
            if full and fixed:
                report.truecased += 1
                report.truecased_messages += fixed
            held_out = int.from_bytes(digest[:4], "big") % 10_000 < options.test_fraction * 10_000
            messages = [{"content": m["content"], "role": m["role"]} for m in messages]  # null extra keys left out
            turns = sum(m["role"] == "user" for m in messages)
            row = {"prompt": prompt, "prompt_id": digest.hex(), "messages": messages, "num_turns": turns}
            yield target or ("test" if held_out else "train"), where, row

    def tokenize(self, chunk: list[tuple]) -> list[list[int]]:
        dialogues = [row["messages"] for _, _, row in chunk]
        return tokenize_dialogues(self.tokenizer, dialogues, self.options.system_turn, self.options.tokenization)

    def collect(self, report: SplitReport, chunk: list[tuple], job) -> None:
        """Apply the token bounds to a tokenized chunk and write its kept rows to their output splits."""
        import pyarrow as pa

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
                columns = {key: [row[key] for row in rows] for key in rows[0]}
                input_ids = pa.array(tokens, type=pa.list_(pa.int32()))  # faster than datasets' typing of the lists
                self.output.write(dest, {**columns, "input_ids": input_ids, "num_tokens": list(map(len, tokens))})


def prepare(splits: dict[str, Split], tokenizer, out_dir=None, *, source="", revision=None, progress=False, **options):
    """Run the filters, truecasing, template and tokenizer over ``splits`` (from ``open_source``) with ``options``
    (``Options``' fields). With ``out_dir``, the kept rows go to ``train`` and ``test`` (a single-split source holds
    out ``test_fraction`` by prompt hash), swapped into place when complete; OutputError if no training row was kept."""
    opts = Options(**options)
    out = check_output(out_dir, source or None) if out_dir is not None else None
    fingerprint = source_fingerprint(source, revision) if source else None
    output = OutputWriter(out) if out is not None else None
    try:
        run, reports = _Run(tokenizer, opts, output), {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            for name in sorted(splits, key=lambda s: (SPLIT_NAMES.get(s, "train") != "train", s)):  # train first
                target = None if len(splits) == 1 else SPLIT_NAMES.get(name, "train")
                reports[name] = run.split(name, splits[name], target, pool, progress)
        lengths = {name: np.frombuffer(values, dtype=np.int32) for name, values in run.lengths.items()}
        rs = reports.values()
        report = {
            "format": FORMAT,
            "source": source,
            "source_fingerprint": fingerprint,
            "input_rows": sum(r.input_rows for r in rs),
            "kept": sum(r.kept for r in rs),
            "dropped": dict(sorted(sum((r.dropped for r in rs), Counter()).items())),
            "truecased": sum(r.truecased for r in rs),
            "truecased_messages": sum(r.truecased_messages for r in rs),
            "filters_applied": ["structure", *(FILTER_CHAIN if "applied" in run.chain else ())],
            "filters_audited": list(FILTER_CHAIN if "audited" in run.chain else ()),
            "audited": dict(sorted(sum((r.audited for r in rs), Counter()).items())),
            "system_turn": opts.system_turn,
            "tokenization": opts.tokenization,
            "options": dataclasses.asdict(opts),  # all of them: a later release prepares the folder again with these
            "splits": {name: r.to_json() for name, r in reports.items()},
            "outputs": {name: token_stats(n, opts.max_length) for name, n in lengths.items()},
            "empty_splits_not_written": [name for name, n in lengths.items() if not len(n)],
            "tokenizer": tokenizer_name(tokenizer),  # which one made the ids (a Hub id may fall back offline)
        }
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
    source: str, out_dir: str | Path, tokenizer, *, revision: str | None = None, progress: bool = False, **options: Any
) -> dict:
    """Prepare ``source`` (a file, a folder or a Hub id) into ``out_dir``; return the report. OptionError, OutputError
    and SourceError come before any work, and before loading ``tokenizer`` when it is a name (None: the embedded)."""
    max_chars = Options(**options).max_chars
    check_output(out_dir, source)
    with datasets_progress(progress):
        splits = open_source(source, max_chars, revision)
    if tokenizer is None or isinstance(tokenizer, str):
        from utils.assets import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return prepare(splits, tokenizer, out_dir, source=source, revision=revision, progress=progress, **options).report
