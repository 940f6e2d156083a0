"""Notebook 01 as a command: filter UltraChat, truecase it, render the Zephyr template, tokenize, count, save.

    python -m utils.prepare_data --source data/sample/ultrachat_200k --out data/processed/ultrachat
    python -m utils.prepare_data --source HuggingFaceH4/ultrachat_200k --out data/processed/ultrachat_200k

Every input row ends *kept* or *dropped* with exactly one reason, and ``kept + dropped == input`` is asserted for
every split. Rows in the ultrachat_200k schema were already filtered and truecased by its authors: by default they
only pass the structure check, and the other filters run as an *audit* (counted, not applied). Raw UltraChat rows
get the whole chain. The output is a ``datasets.DatasetDict`` (``train``, and ``test`` when it has rows) plus
``report.json``, swapped into place only once complete, into a folder that holds nothing but this tool's output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils import REPO_ROOT
from utils.filters import disclaimer_in, load_disclaimers, structure_problem, truecase_messages

MAX_LENGTH = 2048
TEST_FRACTION = 0.1  # for sources with a single split (raw UltraChat): ultrachat_200k holds out about 10%
SPLIT_NAMES = {"train_sft": "train", "test_sft": "test", "train": "train", "test": "test"}
CHUNK_ROWS = 500  # rows tokenized per batch (in a worker thread, overlapping the filters)
MAX_CHARS = 200_000  # a row with more characters is dropped as too_large (ultrachat_200k's longest is ~60k)
FILTER_CHAIN = ("truecase", "disclaimer", "duplicate_prompt")  # after the structure check, which always applies
FILTER_MODES = ("auto", "all", "structure")
MARKER = ".prepared-by-utils.prepare_data"  # identifies a folder this tool wrote, so it may replace it
FORMAT = 2  # report.json's "format": 2 added the empty system turn; an older output is prepared again when reused


class SourceError(Exception):
    """A source that cannot be read at all (missing file, unreachable Hub): one line for the user."""


class OutputError(Exception):
    """An output folder this tool must not write into: one line for the user, before any work."""


# --- reading ---------------------------------------------------------------------------------------------------------
Row = tuple[int, Any, str | None]  # (line number, parsed object, parse error reason)


def read_jsonl(path: Path, max_chars: int = MAX_CHARS) -> Iterator[Row]:
    """Yield ``(line_no, obj, None)`` per JSON object line; a bad line yields ``(line_no, None, reason)``.

    Reasons: ``invalid_utf8``, ``too_large`` (over ``max_chars``), ``invalid_json``, ``not_an_object``. A UTF-8
    byte-order mark before the first line is accepted.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            if len(raw) > 4 * max_chars:  # too large whatever it decodes to: never parse it
                yield line_no, None, "too_large"
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None, "invalid_utf8"
                continue
            if len(line) > max_chars:
                yield line_no, None, "too_large"
                continue
            yield _parse(line_no, line)


def _parse(line_no: int, line: str) -> Row:
    try:
        obj = json.loads(line)
    except ValueError:
        return line_no, None, "invalid_json"
    return (line_no, obj, None) if isinstance(obj, dict) else (line_no, None, "not_an_object")


def read_json(path: Path, max_chars: int = MAX_CHARS) -> Iterator[Row]:
    """A ``.json`` file: a JSON array of rows (numbered from 1), or JSON Lines under a ``.json`` name."""
    try:
        head = path.open("rb").read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head.startswith(b"["):
        yield from read_jsonl(path, max_chars)
        return
    try:
        rows = json.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"{path} starts like a JSON array but is not valid JSON: {str(exc).splitlines()[0]}"
        ) from None
    for i, obj in enumerate(rows, start=1):
        yield (i, obj, None) if isinstance(obj, dict) else (i, None, "not_an_object")


def read_parquet(path: Path) -> Iterator[Row]:
    """Yield the rows of a Parquet file (as written by the Hub's ultrachat_200k), numbered from 1."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise SourceError(f"cannot read {path}: not a valid Parquet file ({str(exc).splitlines()[0]})") from None
    for i, obj in enumerate(table.to_pylist(), start=1):
        yield i, obj, None


def _check_parquet(path: Path) -> None:
    """Read a Parquet file's footer now, so a damaged file is one error line before any work."""
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"cannot read {path}: not a valid Parquet file ({str(exc).splitlines()[0]})") from None


def local_path(source: str) -> Path | None:
    """The local file or folder ``source`` names (relative to here or to the collection), or None for a Hub id."""
    path = Path(source)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / source).exists():
        path = REPO_ROOT / source
    return path if path.exists() else None


def open_source(source: str, max_chars: int = MAX_CHARS, revision: str | None = None) -> dict[str, Iterable[Row]]:
    """Map each split of ``source`` (a folder, a file or a Hub dataset id) to an iterable of rows.

    A folder contributes one split per ``.jsonl``/``.json``/``.parquet`` file (named by the file: ``train_sft``,
    ``test_sft``, ...); a single file is one split called ``train``. Damaged Parquet files are found here, before
    any work; ``revision`` pins a Hub dataset's commit.
    """
    path = local_path(source)
    if path is not None and path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise SourceError(f"{source} is already a prepared dataset (notebook 01's output), not a source")
        files = sorted(p for p in path.iterdir() if p.suffix in {".jsonl", ".json", ".parquet"})
        if not files:
            raise SourceError(f"no .jsonl, .json or .parquet files in {path}")
        splits: dict[str, Iterable[Row]] = {}
        for file in files:
            name = file.stem.split("-")[0]  # Hub parquet shards look like train_sft-00000-of-00003
            splits[name] = _chain(splits.get(name), _reader(file, max_chars))
        return splits
    if path is not None:
        return {"train": _reader(path, max_chars)}
    if (
        Path(source).suffix in {".jsonl", ".json", ".parquet"}
        or source.startswith((".", "/"))
        or source.count("/") != 1
    ):
        raise SourceError(f"no such file or folder: {source}")
    return _open_hub(source, revision)


def _reader(path: Path, max_chars: int = MAX_CHARS) -> Iterable[Row]:
    if path.suffix == ".parquet":
        _check_parquet(path)
        return _Lazy(read_parquet, path)
    if not os.access(path, os.R_OK) or not path.is_file():
        raise SourceError(f"cannot read {path}: {'not a file' if path.exists() else 'no such file'}")
    return _Lazy(read_json if path.suffix == ".json" else read_jsonl, path, max_chars)


class _Lazy:
    """Re-iterable wrapper, and opening errors surface when iteration starts (inside the accounting)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __iter__(self):
        return iter(self.fn(*self.args))


def _chain(first: Iterable[Row] | None, second: Iterable[Row]) -> Iterable[Row]:
    if first is None:
        return second
    return _Lazy(lambda: (row for part in (first, second) for row in part))


def _open_hub(dataset_id: str, revision: str | None = None) -> dict[str, Iterable[Row]]:
    from utils.hardware import hub_reachable

    if not hub_reachable():
        raise SourceError(
            f"the Hugging Face Hub is unreachable, so {dataset_id} cannot be loaded; "
            "pass a local path such as data/sample/ultrachat_200k"
        )
    import datasets

    try:  # only the SFT splits: ultrachat_200k also has train_gen/test_gen, which we never read
        names = [n for n in datasets.get_dataset_split_names(dataset_id, revision=revision) if n in SPLIT_NAMES]
        loaded = {name: datasets.load_dataset(dataset_id, split=name, revision=revision) for name in names}
    except Exception as exc:  # noqa: BLE001 - one line for any Hub/loader failure
        raise SourceError(f"cannot load {dataset_id} from the Hub: {str(exc).splitlines()[0]}") from None
    if not loaded:
        raise SourceError(f"{dataset_id} has none of the splits {', '.join(SPLIT_NAMES)}")
    return {
        name: _Lazy(lambda split: ((i, row, None) for i, row in enumerate(split, start=1)), split)
        for name, split in loaded.items()
    }


# --- one row -----------------------------------------------------------------------------------------------------
def to_messages(obj: dict) -> tuple[Any, str | None]:
    """The ``messages`` of a row in either schema (ultrachat_200k, or raw ``id`` + ``data``), or a drop reason."""
    if "messages" in obj:
        return obj["messages"], None
    if "data" in obj:
        data = obj["data"]
        if not isinstance(data, list):
            return None, "structure:not_a_list"
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(data)], None
    return None, "missing_messages"


def prompt_id(prompt: str) -> str:
    """The ultrachat_200k ``prompt_id``: the SHA-256 hex digest of the prompt."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


EMPTY_SYSTEM = {"role": "system", "content": ""}


def with_system_turn(messages: list[dict]) -> list[dict]:
    """``messages`` with an empty system turn first when they have none, as the card's alignment-handbook did.

    Its ``apply_chat_template`` (src/alignment/data.py at a0b8d49) inserted ``{"role": "system", "content": ""}``
    into every SFT dialogue without one, so every training text began ``<s><|system|>\n</s>\n<|user|>``.
    """
    return messages if messages and messages[0]["role"] == "system" else [EMPTY_SYSTEM, *messages]


def render(messages: list[dict], eos: str = "</s>", system_turn: bool = True) -> str:
    """The Zephyr template (``configs/chat_template.jinja``) in plain Python, plus the EOS TRL appends to text.

    With ``system_turn`` (the card's data), an empty system turn comes first where the dialogue has none. Identical
    to ``tokenizer.apply_chat_template(with_system_turn(messages), tokenize=False) + eos`` (a test checks it), and
    about 50x faster than Jinja. The trailing EOS is what both TRL 1.x (``add_eos`` on text datasets) and the card's
    TRL (EOS as the separator between packed samples) put after each dialogue.
    """
    return "".join([f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in segments_of(messages, system_turn)]) + eos


def segments_of(messages: list[dict], system_turn: bool = True) -> list[dict]:
    return with_system_turn(messages) if system_turn else messages


# --- the pipeline --------------------------------------------------------------------------------------------------
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
        assert total == self.input_rows, (
            f"{split}: kept {self.kept} + dropped {total - self.kept} != input {self.input_rows}"
        )

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
    """What ``prepare`` returns: the kept rows per output split and the accounting per input split."""

    rows: dict[str, dict[str, list]]  # output split -> column -> values
    reports: dict[str, SplitReport]
    max_length: int
    system_turn: bool = True

    def report(self, source: str = "") -> dict:
        """The content of ``report.json``: totals, per-split accounting and token statistics."""
        dropped: Counter = Counter()
        audited: Counter = Counter()
        for r in self.reports.values():
            dropped.update(r.dropped)
            audited.update(r.audited)
        return {
            "format": FORMAT,
            "source": source,
            "input_rows": sum(r.input_rows for r in self.reports.values()),
            "kept": sum(r.kept for r in self.reports.values()),
            "dropped": dict(sorted(dropped.items())),
            "truecased": sum(r.truecased for r in self.reports.values()),
            "truecased_messages": sum(r.truecased_messages for r in self.reports.values()),
            "filters_applied": [
                "structure",
                *(f for f in FILTER_CHAIN if any(f in r.applied for r in self.reports.values())),
            ],
            "filters_audited": [f for f in FILTER_CHAIN if any(f in r.audit_only for r in self.reports.values())],
            "audited": dict(sorted(audited.items())),
            "system_turn": self.system_turn,
            "splits": {name: r.to_json() for name, r in self.reports.items()},
            "outputs": {name: token_stats(cols["num_tokens"], self.max_length) for name, cols in self.rows.items()},
        }


def prepare(
    splits: dict[str, Iterable[Row]],
    tokenizer,
    disclaimers: list[str] | None = None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    max_length: int = MAX_LENGTH,
    test_fraction: float = TEST_FRACTION,
    max_rows: int | None = None,
    progress: bool = True,
    filters: str = "auto",
    system_turn: bool = True,
    max_chars: int = MAX_CHARS,
) -> Prepared:
    """Run the filters, the truecasing, the template and the tokenizer over ``splits``.

    ``filters``: ``"auto"`` applies the whole chain (truecasing, disclaimers, duplicate prompts) to raw UltraChat
    rows and only *audits* it on ultrachat_200k rows, which its authors already filtered; ``"all"`` applies it to
    every row; ``"structure"`` audits it everywhere. The structure check always applies. Output splits are ``train``
    and ``test``; a source with a single split gets a deterministic ``test_fraction`` held out by prompt hash.
    """
    from tqdm.auto import tqdm

    if filters not in FILTER_MODES:
        raise ValueError(f"filters must be one of {', '.join(FILTER_MODES)}, got {filters!r}")
    phrases = load_disclaimers() if disclaimers is None else [p.lower() for p in disclaimers]
    seen: set[str] = set()
    columns = ("prompt", "prompt_id", "messages", "input_ids", "num_tokens", "num_turns")
    out: dict[str, dict[str, list]] = {"train": {c: [] for c in columns}, "test": {c: [] for c in columns}}
    reports: dict[str, SplitReport] = {}
    single = len(splits) == 1
    ordered = sorted(splits, key=lambda s: (SPLIT_NAMES.get(s, "train") != "train", s))  # train first: wins duplicates

    for split in ordered:
        report = reports[split] = SplitReport()
        target = "train" if single else SPLIT_NAMES.get(split, "train")
        pending: list[tuple[str, str, str, list, str]] = []  # (out split, prompt, prompt_id, messages, where)
        in_flight: list = []  # at most one (rows, future) being tokenized while the next chunk is filtered

        def collect(rows: list, ids_future, report: SplitReport = report) -> None:
            for (dest, prompt, pid, messages, where), ids in zip(rows, ids_future.result(), strict=True):
                n = len(ids)
                if min_tokens is not None and n < min_tokens:
                    report.drop("too_short", where, {"messages": messages, "num_tokens": n})
                    continue
                if max_tokens is not None and n > max_tokens:
                    report.drop("too_long", where, {"messages": messages, "num_tokens": n})
                    continue
                cols = out[dest]
                cols["prompt"].append(prompt)
                cols["prompt_id"].append(pid)
                cols["messages"].append(messages)
                cols["input_ids"].append(ids)
                cols["num_tokens"].append(n)
                cols["num_turns"].append(sum(m["role"] == "user" for m in messages))
                report.kept += 1

        def flush(pending: list = pending, in_flight: list = in_flight) -> None:
            # The Rust tokenizer releases the GIL: tokenize this chunk in the worker while Python filters the next.
            dialogues = [segments_of(m, system_turn) for *_, m, _ in pending]
            job = (list(pending), pool.submit(tokenize_dialogues, tokenizer, dialogues))
            pending.clear()
            if in_flight:
                collect(*in_flight.pop())
            in_flight.append(job)

        bar = tqdm(desc=f"{split}", unit=" rows", disable=not progress, mininterval=1.0)
        with ThreadPoolExecutor(max_workers=1) as pool:
            for line_no, obj, error in splits[split]:
                if max_rows is not None and report.input_rows >= max_rows:
                    break
                report.input_rows += 1
                bar.update()
                where = f"{split}:{line_no}"
                if error:
                    report.drop(error, where, None)
                    continue
                messages, reason = to_messages(obj)
                reason = reason or structure_problem(messages) or content_problem(messages, max_chars)
                if reason:
                    report.drop(reason, where, obj if reason != "too_large" else None)
                    continue
                full = filters == "all" or (filters == "auto" and "messages" not in obj)
                (report.applied if full else report.audit_only).update(FILTER_CHAIN)
                fixed_messages, fixed = truecase_messages(messages)
                if full:
                    messages = fixed_messages
                elif fixed:
                    report.audit("truecase", where, obj)
                    fixed = 0
                if disclaimer_in(fixed_messages, phrases):
                    if full:
                        report.drop("disclaimer", where, obj)
                        continue
                    report.audit("disclaimer", where, obj)
                prompt = next(m["content"] for m in messages if m["role"] == "user")
                if prompt in seen:
                    if full:
                        report.drop("duplicate_prompt", where, obj)
                        continue
                    report.audit("duplicate_prompt", where, obj)
                seen.add(prompt)
                if fixed:
                    report.truecased += 1
                    report.truecased_messages += fixed
                pid = prompt_id(prompt)
                dest = target
                if single:
                    dest = "test" if int(pid[:8], 16) % 10_000 < test_fraction * 10_000 else "train"
                pending.append((dest, prompt, pid, messages, where))
                if len(pending) >= CHUNK_ROWS:
                    flush()
            if pending:
                flush()
            if in_flight:
                collect(*in_flight.pop())
        bar.close()
        report.check(split)
    return Prepared(out, reports, max_length, system_turn)


def content_problem(messages: list[dict], max_chars: int = MAX_CHARS) -> str | None:
    """``too_large`` over ``max_chars`` characters; ``invalid_unicode`` for text UTF-8 cannot encode (a lone
    surrogate such as a JSON-escaped ``\\ud800``); else None."""
    if sum(len(m["content"]) for m in messages) > max_chars:
        return "too_large"
    try:
        for m in messages:
            m["content"].encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_unicode"
    return None


def tokenize_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]`` (BOS included), through the Rust backend's batch call without offsets.

    Same ids, about 1.5x faster: character offsets are never needed here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts)]


def tokenize_dialogues(tokenizer, dialogues: list[list[dict]]) -> list[list[int]]:
    """Token ids of each rendered dialogue, with special-token text inside messages kept as plain text.

    A message that contains the characters ``</s>`` must not end the turn: only the template's own markers become
    control tokens. Dialogues without such text (nearly all) are tokenized whole, the fast way; the others segment
    by segment (see ``tokenize_safely``), which gives the same ids wherever the text has no special tokens.
    """
    eos = tokenizer.eos_token
    specials = [t for t in tokenizer.all_special_tokens if t]
    ids: list[list[int] | None] = [None] * len(dialogues)
    plain = [i for i, d in enumerate(dialogues) if not any(t in m["content"] for m in d for t in specials)]
    texts = [render(dialogues[i], eos, False) for i in plain]
    for i, encoded in zip(plain, tokenize_batch(tokenizer, texts), strict=True):
        ids[i] = encoded
    for i, dialogue in enumerate(dialogues):
        if ids[i] is None:
            ids[i] = tokenize_safely(tokenizer, dialogue)
    return ids  # type: ignore[return-value]


def tokenize_safely(tokenizer, messages: list[dict]) -> list[int]:
    """``<s>`` + the rendered dialogue, where the template's ``</s>`` are EOS ids and the messages' text is encoded
    with special tokens split into ordinary pieces (``split_special_tokens``).

    The tokenizer splits text at special tokens and encodes each piece alone, so encoding the pieces between the
    template's EOS markers one by one, with only the first getting the sentencepiece word-start, is what a whole-text
    encoding does.
    """
    first, rest = _split_special_encoders(tokenizer)
    pieces = [("\n" if i else "") + f"<|{m['role']}|>\n{m['content']}" for i, m in enumerate(messages)] + ["\n"]
    ids = [tokenizer.bos_token_id]
    for i, piece in enumerate(pieces):
        if piece:
            ids += (first if i == 0 else rest).encode(piece, add_special_tokens=False).ids
        ids.append(tokenizer.eos_token_id)
    return ids


_ENCODERS: dict[int, tuple] = {}


def _split_special_encoders(tokenizer) -> tuple:
    """Two copies of the Rust tokenizer that encode special-token text as plain text: one adding the word-start
    ``▁`` (for the first piece), one without (for the pieces after an EOS)."""
    from tokenizers import Tokenizer

    key = id(tokenizer)
    if key not in _ENCODERS:
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        first = Tokenizer.from_str(json.dumps(state))
        if (state.get("pre_tokenizer") or {}).get("prepend_scheme") == "first":
            state["pre_tokenizer"]["prepend_scheme"] = "never"
        rest = Tokenizer.from_str(json.dumps(state))
        for encoder in (first, rest):
            encoder.encode_special_tokens = True
        _ENCODERS[key] = (first, rest)
    return _ENCODERS[key]


# --- token statistics and packing --------------------------------------------------------------------------------
def token_stats(num_tokens: list[int], max_length: int = MAX_LENGTH) -> dict:
    """Dialogue count, token totals and percentiles, the share over ``max_length`` and packed-sequence counts."""
    lengths = np.asarray(num_tokens, dtype=np.int64)
    if lengths.size == 0:
        return {
            "dialogues": 0,
            "total_tokens": 0,
            "share_over_max_length": 0.0,
            "dialogues_truncated_by_bfd": 0,
            "tokens_truncated_by_bfd": 0,
            "packed_sequences_wrapped": 0,
            "packed_sequences_bfd": 0,
            "packed_sequences_bfd_split": 0,
            "max_length": max_length,
        }
    over = np.maximum(lengths - max_length, 0)
    return {
        "dialogues": int(lengths.size),
        "total_tokens": int(lengths.sum()),
        "mean_tokens": round(float(lengths.mean()), 1),
        "median_tokens": int(np.median(lengths)),
        "p95_tokens": int(np.percentile(lengths, 95)),
        "max_tokens": int(lengths.max()),
        "max_length": max_length,
        "share_over_max_length": round(float((lengths > max_length).mean()), 4),
        # bfd truncates a dialogue to max_length; bfd_split and wrapped keep every token
        "dialogues_truncated_by_bfd": int((over > 0).sum()),
        "tokens_truncated_by_bfd": int(over.sum()),
        "share_of_tokens_truncated_by_bfd": round(float(over.sum() / lengths.sum()), 5),
        "packed_sequences_wrapped": math.ceil(int(lengths.sum()) / max_length),
        "packed_sequences_bfd": count_bfd_bins(lengths.tolist(), max_length),
        "packed_sequences_bfd_split": count_bfd_bins(split_lengths(lengths.tolist(), max_length), max_length),
    }


def split_lengths(lengths: list[int], max_length: int) -> list[int]:
    """The pieces ``packing_strategy="bfd_split"`` packs: each dialogue cut into ``max_length`` chunks."""
    return [min(max_length, n - start) for n in lengths for start in range(0, n, max_length)]


def count_bfd_bins(lengths: list[int], capacity: int) -> int:
    """How many ``capacity``-token sequences best-fit-decreasing packing fills (longer dialogues are truncated).

    Same rule as TRL's ``packing_strategy="bfd"``: each dialogue, longest first, goes into the open sequence with the
    least room that still fits it. Capacities are small integers, so the open sequences are kept as a count per free
    size plus a sorted list of the sizes present: O(n log capacity).
    """
    count = [0] * (capacity + 1)
    sizes: list[int] = []  # sorted distinct free sizes with count > 0
    bins = 0
    for length in sorted((min(n, capacity) for n in lengths), reverse=True):
        i = bisect_left(sizes, length)
        if i < len(sizes):
            free = sizes[i]
            count[free] -= 1
            if count[free] == 0:
                sizes.pop(i)
        else:
            bins += 1
            free = capacity
        left = free - length
        if left > 0:
            if count[left] == 0:
                insort(sizes, left)
            count[left] += 1
    return bins


def pack_wrapped(input_ids: list[list[int]], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Concatenate every dialogue and cut the stream into rows of ``max_length`` (the card's TRL packing).

    The last, partial row is dropped, as TRL 0.7's ConstantLengthDataset did.
    """
    stream = (
        np.concatenate([np.asarray(ids, dtype=np.int32) for ids in input_ids]) if input_ids else np.zeros(0, np.int32)
    )
    rows = stream.size // max_length
    return stream[: rows * max_length].reshape(rows, max_length)


def plot_token_histogram(prepared: Prepared, path: Path | None = None):
    """Tokens per dialogue, one panel per output split (so the small test split stays visible), on an axis fitted
    to the data; ``max_length`` is drawn where it falls inside, else named in the title. Saved when ``path``."""
    import matplotlib.pyplot as plt

    splits = [(name, cols["num_tokens"]) for name, cols in prepared.rows.items() if cols["num_tokens"]]
    fig, axes = plt.subplots(
        len(splits) or 1, 1, figsize=(8, 1.6 + 1.4 * max(1, len(splits))), sharex=True, squeeze=False
    )
    longest = max((max(n) for _, n in splits), default=prepared.max_length)
    right = longest * 1.05 if longest < prepared.max_length else max(longest, prepared.max_length) * 1.05
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (i, (name, lengths)) in zip(axes[:, 0], enumerate(splits), strict=False):  # no splits: one empty panel
        ax.hist(lengths, bins=40, range=(0, right), color=colors[i], label=f"{name}: {len(lengths)} dialogues")
        if prepared.max_length <= right:
            ax.axvline(prepared.max_length, color="black", linestyle="--", label=f"max_length {prepared.max_length}")
        ax.set_ylabel("dialogues")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlim(0, right)
    axes[-1, 0].set_xlabel("tokens per dialogue (Zephyr template, Mistral tokenizer)")
    if prepared.max_length > right:
        axes[0, 0].set_title(
            f"every dialogue fits in max_length {prepared.max_length} (off the right edge)", fontsize=9
        )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --- writing -------------------------------------------------------------------------------------------------------
def is_own_output(folder: Path) -> bool:
    """True for a folder this tool wrote: it holds the marker file (or, from before the marker, the pair
    ``dataset_dict.json`` + ``report.json``)."""
    return (folder / MARKER).is_file() or (
        (folder / "dataset_dict.json").is_file() and (folder / "report.json").is_file()
    )


def is_current(folder: Path) -> bool:
    """True for this tool's output in the current format (reusable as a cache)."""
    try:
        return is_own_output(folder) and json.loads((folder / "report.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def check_output(out_dir: str | Path, source: str | None = None) -> Path:
    """Refuse, with one line, an output this tool must not write: a file, a non-empty folder it did not write,
    the source itself (or a folder holding it), or a place it cannot write to. Called before any work."""
    out = Path(out_dir)
    recover_swap(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; name a folder (it is created, or replaced if this tool wrote it)")
    src = local_path(source) if source else None
    if src is not None:
        src_dir = src.resolve() if src.is_dir() else src.resolve().parent
        if out.resolve() == src_dir or src_dir.is_relative_to(out.resolve()):
            raise OutputError(f"--out {out} would replace the source {source}; write the output somewhere else")
    if out.is_dir() and any(out.iterdir()) and not is_own_output(out):
        raise OutputError(f"--out {out} already holds files this tool did not write; choose a new or empty folder")
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(parent, os.W_OK) or (out.is_dir() and not os.access(out.parent, os.W_OK)):
        raise OutputError(f"cannot write to {out}: {parent} is not writable")
    return out


def recover_swap(out: Path) -> None:
    """Finish what a killed run left: restore ``out`` from its ``.old`` copy when ``out`` is missing, and remove the
    temporary folders of runs that are no longer alive."""
    parent = out.parent
    if not parent.is_dir():
        return
    old = sorted(parent.glob(f".{out.name}.old-*"))
    if old and not out.exists() and is_own_output(old[-1]):
        old[-1].rename(out)
        print(f"restored {out} from {old[-1].name} (an earlier run was stopped while swapping it in)")
    for tmp in parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save(prepared: Prepared, out_dir: str | Path, source: str = "") -> dict:
    """Write the DatasetDict and ``report.json`` to a temporary sibling of ``out_dir``, then swap it into place.

    An empty split is not written (the report says so); with no training rows at all nothing is written and
    OutputError says why. ``out_dir`` must pass ``check_output``.
    """
    import datasets

    out_dir = check_output(out_dir, source or None)
    if not prepared.rows["train"]["prompt"]:
        raise OutputError(f"no training rows were kept from {source or 'the source'}; nothing written to {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "prompt_id": datasets.Value("string"),
            "messages": datasets.List({"content": datasets.Value("string"), "role": datasets.Value("string")}),
            "input_ids": datasets.List(datasets.Value("int32")),
            "num_tokens": datasets.Value("int32"),
            "num_turns": datasets.Value("int32"),
        }
    )
    report = prepared.report(source)
    report["empty_splits_not_written"] = [name for name, cols in prepared.rows.items() if not cols["prompt"]]
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-{os.getpid()}-"))
    try:
        dataset = datasets.DatasetDict(
            {
                name: datasets.Dataset.from_dict(cols, features=features)
                for name, cols in prepared.rows.items()
                if cols["prompt"]
            }
        )
        from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        shown = not are_progress_bars_disabled()
        disable_progress_bars()  # a bar per split for a sub-second save is noise
        try:
            dataset.save_to_disk(str(tmp))
        finally:
            if shown:
                enable_progress_bars()
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / MARKER).write_text("Written by python -m utils.prepare_data; it may replace this folder.\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name[-8:]}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --- command line --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.prepare_data", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default="data/sample/ultrachat_200k",
        help="folder or file of JSON Lines/JSON/Parquet (either UltraChat schema), or a Hub dataset id",
    )
    parser.add_argument("--revision", default=None, help="Hub dataset commit or tag to load (default: main)")
    parser.add_argument(
        "--out",
        default="data/processed/ultrachat",
        help="output folder: new, empty, or written by this tool before (then replaced when complete)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="Hub id of the tokenizer; default: the embedded Mistral-7B tokenizer"
    )
    parser.add_argument(
        "--filters",
        default="auto",
        choices=FILTER_MODES,
        help="auto: the whole chain on raw UltraChat, an audit on ultrachat_200k rows; all: apply "
        "every filter to every row; structure: audit the chain everywhere",
    )
    parser.add_argument(
        "--no-system-turn",
        action="store_true",
        help="do not insert the empty system turn the card's recipe put before every dialogue",
    )
    parser.add_argument("--disclaimers", default=None, help="file of disclaimer phrases, one per line")
    parser.add_argument("--min-tokens", type=int, default=None, help="drop dialogues shorter than this")
    parser.add_argument("--max-tokens", type=int, default=None, help="drop dialogues longer than this")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS, help="drop rows with more characters (too_large)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="training length for the statistics")
    parser.add_argument(
        "--test-fraction", type=float, default=TEST_FRACTION, help="held-out share for single-split sources"
    )
    parser.add_argument("--max-rows", type=int, default=None, help="read at most this many rows per split")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("min_tokens", "max_tokens", "max_length", "max_rows", "max_chars"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    if not 0 <= args.test_fraction < 1:
        print(f"error: --test-fraction must be in [0, 1), got {args.test_fraction}", file=sys.stderr)
        return 2
    try:
        check_output(args.out, args.source)
        splits = open_source(args.source, args.max_chars, args.revision)
        disclaimers = load_disclaimers(args.disclaimers) if args.disclaimers else None
        from utils.assets import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        prepared = prepare(
            splits,
            tokenizer,
            disclaimers,
            args.min_tokens,
            args.max_tokens,
            args.max_length,
            args.test_fraction,
            args.max_rows,
            progress=not args.no_progress,
            filters=args.filters,
            system_turn=not args.no_system_turn,
            max_chars=args.max_chars,
        )
        report = save(prepared, args.out, args.source)
    except (SourceError, OutputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{report['input_rows']} rows read, {report['kept']} kept, {sum(report['dropped'].values())} dropped, "
        f"{report['truecased']} truecased -> {args.out}"
    )
    print(
        f"  filters applied: {', '.join(report['filters_applied'])}; audited only: "
        f"{', '.join(report['filters_audited']) or 'none'}"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
