"""Reading a source as numbered rows, streamed: JSON Lines, JSON, Parquet, a Hub dataset or a folder in its layout.

A row is ``(number, object, None)``, or ``(number, None, drop reason)`` for a line that cannot be a row. Nothing
here holds more than a batch of rows in memory, except a ``.json`` array, which is parsed whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from utils import REPO_ROOT, ConfigError

MAX_CHARS = 200_000  # a row with more characters is dropped as too_large (ultrachat_200k's longest is ~60k)
SPLIT_NAMES = {"train_sft": "train", "test_sft": "test", "train": "train", "test": "test"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
BATCH_ROWS = 1000  # Arrow rows turned into Python objects at a time
BOM = b"\xef\xbb\xbf"

Row = tuple[int, Any, str | None]  # (row number, parsed object, drop reason)


class SourceError(ConfigError):
    """A source that cannot be read at all (missing file, unreachable Hub): one line for the user."""


class Split:
    """The rows of one split, read again at each iteration; ``num_rows`` when the files say it (Parquet, Arrow)."""

    def __init__(self, read: Callable[[], Iterator[Row]], num_rows: int | None = None):
        self.read, self.num_rows = read, num_rows

    def __iter__(self) -> Iterator[Row]:
        return self.read()


# --- files ---------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path, max_chars: int = MAX_CHARS) -> Iterator[Row]:
    """The rows of a JSON Lines file (a UTF-8 byte-order mark accepted); a bad line gets its drop reason."""
    limit = 4 * max_chars  # bytes: a line longer is too large whatever it decodes to, and is never held whole
    with path.open("rb") as handle:
        line_no = 0
        while raw := handle.readline(limit + 1):  # not enumerate(): its reused tuple would keep a long line's piece
            line_no += 1
            if len(raw) > limit:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = handle.readline(limit + 1)
                yield line_no, None, "too_large"
                continue
            raw = raw.removeprefix(BOM) if line_no == 1 else raw
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None, "invalid_utf8"
                continue
            if len(line) > max_chars:
                yield line_no, None, "too_large"
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack allows
                yield line_no, None, "invalid_json"
                continue
            yield (line_no, obj, None) if isinstance(obj, dict) else (line_no, None, "not_an_object")


def read_json(path: Path, max_chars: int = MAX_CHARS) -> Iterator[Row]:
    """A ``.json`` file: a JSON array of rows (numbered from 1, parsed whole), or JSON Lines under a ``.json`` name."""
    with path.open("rb") as handle:
        array = handle.read(4096).removeprefix(BOM).lstrip().startswith(b"[")
    if not array:
        yield from read_jsonl(path, max_chars)
        return
    try:
        rows = json.loads(path.read_bytes().removeprefix(BOM).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"{path} starts like a JSON array but is not valid JSON: {reason}") from None
    for i, obj in enumerate(rows, start=1):
        yield (i, obj, None) if isinstance(obj, dict) else (i, None, "not_an_object")


def _parquet_file(path: Path):
    """Open a Parquet file and read its footer now, so a damaged file is one error line before any work."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise SourceError(f"cannot read {path}: not a valid Parquet file ({str(exc).splitlines()[0]})") from None


def read_parquet(path: Path) -> Iterator[Row]:
    """The rows of a Parquet file, a batch at a time."""
    number = 0
    try:
        batches = _parquet_file(path).iter_batches(batch_size=BATCH_ROWS)
        for number, obj in enumerate((obj for batch in batches for obj in batch.to_pylist()), start=1):
            yield number, obj, None
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise SourceError(f"cannot read {path} after row {number}: {str(exc).splitlines()[0]}") from None


def _files_split(paths: list[Path], max_chars: int) -> Split:
    """The files of one split, read in order, each numbering its own rows; checked readable here, before any work."""
    for path in paths:
        if path.suffix != ".parquet" and (not os.access(path, os.R_OK) or not path.is_file()):
            raise SourceError(f"cannot read {path}: {'not a file' if path.exists() else 'no such file'}")
    counts = [_parquet_file(p).metadata.num_rows if p.suffix == ".parquet" else None for p in paths]

    def read() -> Iterator[Row]:
        for path in paths:
            if path.suffix == ".parquet":
                yield from read_parquet(path)
            else:
                yield from (read_json if path.suffix == ".json" else read_jsonl)(path, max_chars)

    return Split(read, None if None in counts else sum(counts))


# --- opening a source ----------------------------------------------------------------------------------------------
def local_path(source: str) -> Path | None:
    """The local file or folder ``source`` names (relative to here or to the collection), or None for a Hub id."""
    path = Path(source)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / source).exists():
        path = REPO_ROOT / source
    return path if path.exists() else None


def hub_layout(folder: Path) -> bool:
    """A folder laid out like a Hub dataset repository: no data files of its own, Parquet shards under ``data/``."""
    data = folder / "data"
    return not _data_files(folder) and data.is_dir() and any(p.suffix == ".parquet" for p in data.iterdir())


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES)


def open_source(source: str, max_chars: int = MAX_CHARS, revision: str | None = None) -> dict[str, Split]:
    """Each split of ``source``: one per data file of a folder (shards join one), ``train`` for a file; a Hub id or a
    folder in its layout through ``datasets.load_dataset``, ``SPLIT_NAMES`` only. Damaged Parquet files found here."""
    path = local_path(source)
    if path is not None and path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise SourceError(f"{source} is already a prepared dataset (notebook 01's output), not a source")
        if hub_layout(path):
            return _open_datasets(str(path), None)
        files = _data_files(path)
        if not files:
            raise SourceError(f"no .jsonl, .json or .parquet files in {path}")
        by_split: dict[str, list[Path]] = {}
        for file in files:  # shards are named like train_sft-00000-of-00003
            by_split.setdefault(file.stem.split("-")[0], []).append(file)
        return {name: _files_split(group, max_chars) for name, group in by_split.items()}
    if path is not None:
        return {"train": _files_split([path], max_chars)}
    if Path(source).suffix in DATA_SUFFIXES or source.startswith((".", "/")) or source.count("/") != 1:
        raise SourceError(f"no such file or folder: {source}")
    from utils.hardware import hub_reachable

    if not hub_reachable():
        raise SourceError(
            f"the Hugging Face Hub is unreachable, so {source} cannot be loaded; "
            "pass a local path such as data/sample/ultrachat_200k"
        )
    return _open_datasets(source, revision)


def _open_datasets(name: str, revision: str | None) -> dict[str, Split]:
    """The SFT splits of a Hub id or a local folder in the Hub's layout, as ``datasets.load_dataset`` maps them."""
    import ctypes

    import datasets
    import pyarrow as pa
    from huggingface_hub import HfApi

    path = local_path(name)
    try:
        if path:
            files = [str(p.relative_to(path)) for p in (path / "data").iterdir()]
        else:
            files = HfApi().list_repo_files(name, repo_type="dataset", revision=revision)
        loaded = datasets.load_dataset(name, data_files=sft_data_files(files), revision=revision)
    except Exception as exc:  # noqa: BLE001 - one line for any Hub/loader failure
        where = "the Hub" if path is None else "its folder"
        raise SourceError(f"cannot load {name} from {where}: {str(exc).splitlines()[0]}") from None
    # Converting to Arrow freed buffers, growing with the shards, that the allocators keep for the whole run: hand
    # them back to the system.
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    splits = {split: dataset for split, dataset in loaded.items() if split in SPLIT_NAMES}
    if not splits:
        raise SourceError(f"{name} has none of the splits {', '.join(SPLIT_NAMES)}")
    return {split: Split(lambda d=dataset: read_dataset(d), dataset.num_rows) for split, dataset in splits.items()}


def sft_data_files(files: list[str]) -> dict[str, list[str]] | None:
    """The Parquet shards of the SFT splits among a dataset's files, by split, for ``load_dataset(data_files=...)``;
    None when there are none (the dataset loads whole). ultrachat_200k's larger ``*_gen`` splits are never read."""
    found: dict[str, list[str]] = {}
    for file in sorted(files):
        folder, _, name = file.rpartition("/")
        if folder == "data" and name.endswith(".parquet") and name.split("-")[0] in SPLIT_NAMES:
            found.setdefault(name.split("-")[0], []).append(file)
    return found or None


def read_dataset(dataset) -> Iterator[Row]:
    """The rows of a dataset ``load_dataset`` mapped, streamed from its Arrow cache files a batch at a time: pages of
    its memory map would stay resident, and the whole dataset count in this process's memory."""
    import pyarrow as pa

    number = 0
    for cache_file in dataset.cache_files:
        with pa.OSFile(cache_file["filename"]) as handle:
            for batch in pa.ipc.open_stream(handle):
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    for obj in batch.slice(start, BATCH_ROWS).to_pylist():
                        number += 1
                        yield number, obj, None


@contextlib.contextmanager
def datasets_progress(shown: bool):
    """``datasets``' own progress bars (loading, generating splits) on or off for the duration."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_shown = not are_progress_bars_disabled()
    (enable_progress_bars if shown else disable_progress_bars)()
    try:
        yield
    finally:
        (enable_progress_bars if was_shown else disable_progress_bars)()


def source_fingerprint(source: str, revision: str | None = None) -> str:
    """A hex digest that changes with the source: a local one's resolved path and its data files' names and bytes; a
    Hub id's id and revision, resolved to a commit when the Hub answers (offline: as given, ``main`` by default)."""
    path = local_path(source)
    if path is None:
        from huggingface_hub import HfApi

        from utils.hardware import hub_reachable

        commit = revision or "main"
        if hub_reachable():
            with contextlib.suppress(Exception):  # gated, missing or slow: the revision as given
                commit = HfApi().dataset_info(source, revision=revision, timeout=10).sha or commit
        return hashlib.sha256(f"hub:{source}@{commit}".encode()).hexdigest()
    root = path.resolve()
    digest = hashlib.sha256(f"local:{root}\0".encode())
    for file in [root] if root.is_file() else _data_files(root / "data" if hub_layout(root) else root):
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}\0".encode())
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
