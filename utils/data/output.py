"""Writing a prepared dataset: checks on ``--out`` before any work, a streamed writer into a temporary sibling, the
swap into place once complete, and recovery from a run killed at any point. A folder is this tool's only when it
holds the marker file; nothing else is ever replaced or deleted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from utils import ConfigError, process_alive, temporary_folder
from utils.data.sources import datasets_progress, local_path

MARKER = ".prepared-by-utils.prepare_data"  # identifies a folder this tool wrote, so it may replace it
# report.json's "format": 2 added the empty system turn, 3 the card's token ids, 4 special-token text in messages as
# control tokens in them; older outputs are prepared again
FORMAT = 4
SHARD = "data-00000-of-00001.arrow"  # one shard per split, named as datasets names a single shard


class OutputError(ConfigError):
    """An output folder this tool must not write into: one line for the user, before any work."""


def is_own_output(folder: Path) -> bool:
    """True for a folder this tool wrote: it holds the marker file (a real folder, not a link to one)."""
    return not Path(folder).is_symlink() and (Path(folder) / MARKER).is_file()


def missing_files(folder: Path) -> list[str]:
    """The files of this tool's output that ``folder`` lacks (``dataset_dict.json`` when it names no splits)."""
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        files = [f"{split}/{name}" for split in splits for name in ("state.json", "dataset_info.json", SHARD)]
    except (OSError, ValueError, KeyError, TypeError):
        files = ["dataset_dict.json"]
    return [name for name in (MARKER, "report.json", *files) if not (folder / name).is_file()]


def is_whole(folder: Path) -> bool:
    """True for this tool's output with every file it wrote."""
    return not folder.is_symlink() and not missing_files(folder)


def is_current(folder: Path) -> bool:
    """True for this tool's whole output in the current format (reusable as a cache)."""
    try:
        return is_whole(Path(folder)) and json.loads((Path(folder) / "report.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def check_output(out_dir: str | Path, source: str | None = None) -> Path:
    """Refuse, in one line, an output this tool must not write: a link, a file or under one, a non-empty folder it
    did not write, the source (or a folder holding it), a place it cannot write to; ``recover`` what a run left."""
    out = Path(out_dir)
    if out.is_symlink():
        raise OutputError(f"--out {out} is a symbolic link (to {os.readlink(out)}); name the folder itself")
    ancestor = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists() or p.is_symlink())
    if ancestor != out.absolute() and not ancestor.is_dir():
        raise OutputError(f"--out {out} cannot be created: {ancestor} is a file, not a folder")
    check_unlocked(out)  # before recover: another run's swap is no killed run's
    recover(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; name a folder (it is created, or replaced if this tool wrote it)")
    src = local_path(source) if source else None
    if src is not None:
        src_dir = src.resolve() if src.is_dir() else src.resolve().parent
        if out.resolve() == src_dir or src_dir.is_relative_to(out.resolve()):
            raise OutputError(f"--out {out} would replace the source {source}; write the output somewhere else")
    if out.is_dir() and any(out.iterdir()) and not is_own_output(out):
        raise OutputError(f"--out {out} already holds files this tool did not write; choose a new or empty folder")
    if not os.access(ancestor, os.W_OK) or (out.is_dir() and not os.access(out.parent, os.W_OK)):
        raise OutputError(f"cannot write to {out}: {ancestor} is not writable")
    return out


def check_unlocked(out: Path) -> None:
    """OutputError when another run still alive holds ``out``'s lock (the file beside it with the run's process id)."""
    try:
        pid = int(out.with_name(f".{out.name}.lock").read_text())
    except (OSError, ValueError):
        return
    if pid != os.getpid() and process_alive(pid):
        raise OutputError(
            f"--out {out} is being written by another run (process {pid}); wait for it to end, or choose another folder"
        )


def take_lock(out: Path) -> Path:
    """Create ``out``'s lock, taking over a dead run's (OutputError when a run alive holds it)."""
    lock = out.with_name(f".{out.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            check_unlocked(out)
            lock.unlink(missing_ok=True)  # a killed run's
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        return lock
    check_unlocked(out)
    raise OutputError(f"--out {out}: could not take its lock {lock}")


def recover(out: Path) -> None:
    """Finish what killed runs left beside ``out``: restore ``out`` from its ``.old`` copy when a run was killed
    between its two renames; once ``out`` is whole, delete the ``.old`` copies (this tool's: they hold the marker,
    which is deleted last); delete the temporary folders of runs no longer alive."""
    parent = out.parent
    if not parent.is_dir() or out.is_symlink():
        return
    old = [p for p in parent.glob(f".{out.name}.old-*") if p.is_dir() and not p.is_symlink()]
    whole_old = [p for p in old if is_whole(p)]
    if not out.exists() and whole_old:
        newest = max(whole_old, key=lambda p: (p / "report.json").stat().st_mtime)
        newest.rename(out)
        old.remove(newest)
        print(f"restored {out} from {newest.name} (an earlier run was stopped while swapping it in)")
    if is_whole(out):
        for folder in old:
            if is_own_output(folder) or not any(folder.iterdir()):
                remove_output(folder)
    for tmp in parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if tmp.is_dir() and not tmp.is_symlink() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def remove_output(folder: Path) -> None:
    """Delete a folder this tool wrote, its marker last: a deletion cut short leaves a folder still marked as ours."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name != MARKER:
            child.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


class OutputWriter:
    """Rows streamed into one Arrow file per split inside a temporary sibling of ``out``; ``commit`` adds the
    metadata, ``report.json`` and the marker and swaps the folder into place, ``discard`` removes it."""

    def __init__(self, out: Path):
        import datasets

        out.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.lock = out, take_lock(out)  # released by commit and discard
        try:
            self.tmp = temporary_folder(out.parent, f".{out.name}.tmp-{os.getpid()}-")
        except BaseException:
            self.lock.unlink()
            raise
        self.writers: dict = {}
        # ultrachat_200k's columns, plus the token ids and counts. A Value per column: the fingerprint datasets writes
        # in state.json hashes their pickle, in which a shared one differs.
        self.features = datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "prompt_id": datasets.Value("string"),
                "messages": datasets.List({"content": datasets.Value("string"), "role": datasets.Value("string")}),
                "input_ids": datasets.List(datasets.Value("int32")),
                "num_tokens": datasets.Value("int32"),
                "num_turns": datasets.Value("int32"),
            }
        )

    def write(self, split: str, columns: dict[str, list]) -> None:
        """Append rows (one list, or Arrow array, per column) to ``split``."""
        from datasets.arrow_writer import ArrowWriter

        if split not in self.writers:
            self.writers[split] = ArrowWriter(features=self.features, path=str(self.tmp / f".{split}.arrow"))
        self.writers[split].write_batch(columns)

    def commit(self, report: dict) -> None:
        """Complete the folder and swap it in for ``out`` (whose previous content is deleted only then)."""
        import datasets

        rows = {split: writer.finalize()[0] for split, writer in self.writers.items()}
        for writer in self.writers.values():
            writer.close()
        # datasets writes the folder's metadata (dataset_dict.json, state.json, dataset_info.json) for a one-row
        # stand-in of each split (none for no rows); the streamed shard then replaces the stand-in's.
        stand_in = {"prompt": [""], "prompt_id": [""], "messages": [[]], "input_ids": [[]], "num_tokens": [0]}
        stand_in = datasets.Dataset.from_dict({**stand_in, "num_turns": [0]}, features=self.features)
        with datasets_progress(False):
            datasets.DatasetDict({split: stand_in for split, n in rows.items() if n}).save_to_disk(str(self.tmp))
        for split, n in rows.items():
            if n:
                os.replace(self.tmp / f".{split}.arrow", self.tmp / split / SHARD)
            else:
                (self.tmp / f".{split}.arrow").unlink()
        (self.tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (self.tmp / MARKER).write_text("Written by python -m utils.prepare_data; it may replace this folder.\n")
        old = self.out.with_name(f".{self.out.name}.old-{self.tmp.name[-8:]}") if self.out.exists() else None
        if old is not None:
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            remove_output(old)
        self.lock.unlink(missing_ok=True)

    def discard(self) -> None:
        """Close the files and remove the temporary folder: ``out`` is left as it was."""
        for writer in self.writers.values():
            with contextlib.suppress(Exception):  # closing what an error left half-written
                writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.unlink(missing_ok=True)
