"""The prepared copy of a training source (notebook 01's pipeline run on it) that a run trains on, cached under
``runs/data/``; light to import, so that a process that only needs the data (``utils.sharding``) skips the training
stack."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from utils import RUNS_DIR, ConfigError, say
from utils.data.output import FORMAT, is_current, is_own_output, missing_files
from utils.data.sources import local_path, open_source, source_fingerprint

DATA_CACHE = RUNS_DIR / "data"


def prepared_dataset(source: str, tokenizer, revision: str | None = None) -> Path:
    """The prepared folder to train on: ``source`` itself when notebook 01 wrote it, else its copy under ``runs/data/``
    keyed by the source's content (or Hub id and revision) and the tokenizer, prepared again when the source changed."""
    from utils.data.pipeline import prepare_source

    path = local_path(source)
    if path is not None and (path / "dataset_dict.json").is_file():
        return path if is_current(path) else _prepared_again(path, tokenizer)
    key = hashlib.sha256(f"{source_fingerprint(source, revision)} {tokenizer.name_or_path}".encode()).hexdigest()
    out = DATA_CACHE / f"{Path(source.rstrip('/')).name.replace('/', '__')}-{key[:12]}"
    if is_current(out):
        return out
    check_cache()
    changed = " (it changed since it was last prepared)" if any(DATA_CACHE.glob(f"{out.name[:-13]}-*")) else ""
    say(f"Preparing {source} into {out} (notebook 01's pipeline){changed} ...")
    prepare_source(source, out, tokenizer, revision=revision)
    return out


def check_cache() -> None:
    """ConfigError when the cache cannot be made because MISTRAL_SFT_RUNS (or runs/) is, or is under, a file."""
    blocker = next((p for p in (DATA_CACHE, *DATA_CACHE.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        runs = os.environ.get("MISTRAL_SFT_RUNS")
        where = f"MISTRAL_SFT_RUNS={runs}" if runs else str(RUNS_DIR)
        raise ConfigError(
            f"{where} cannot hold the prepared data: {blocker} is a file, not a folder; "
            "set MISTRAL_SFT_RUNS to a folder"
        )


def _prepared_again(folder: Path, tokenizer) -> Path:
    """A folder notebook 01 wrote in an earlier format, or in today's with files missing, prepared again in place
    from the source its report names with the options it recorded. ConfigError, saying which, when that cannot be
    done: not this tool's folder, its source gone, or options not all recorded (others would change the user's data)."""
    from utils.data.pipeline import Options, prepare, prepare_source

    report = {}
    with contextlib.suppress(OSError, ValueError):
        report = json.loads((folder / "report.json").read_text())
    report = report if isinstance(report, dict) else {}
    today = report.get("format") == FORMAT  # the format is today's: files are missing (a copy without hidden files)
    if today:
        why = f"holds notebook 01's output in today's format, without {', '.join(missing_files(folder))}"
    else:
        why = "was prepared by an earlier release of this collection"
    if not is_own_output(folder):
        copy = "copy it again with its hidden files (cp -a), or " if today else ""
        raise ConfigError(f"{folder} {why}; {copy}prepare it again into a new folder with notebook 01")
    source, options = report.get("source"), report.get("options")
    again = f"prepare it again with notebook 01 (or python -m utils.prepare_data --out {folder}"
    if not (isinstance(source, str) and source and local_path(source)):
        raise ConfigError(f"{folder} {why}; {again})")
    if not isinstance(options, dict) or set(options) - {f.name for f in dataclasses.fields(Options)}:
        # an earlier release did not record them all: those it names and the defaults, if a dry run of them keeps and
        # drops exactly the rows it counted (else the user chose others, which only they know)
        options = {k: report[k] for k in ("system_turn", "tokenization") if k in report}
        try:
            dry = prepare(open_source(source), tokenizer, None, source=source, **options).report
        except ConfigError:
            dry = None
        same = ("input_rows", "kept", "dropped", "filters_applied", "filters_audited")
        if dry is None or any(dry.get(k) != report.get(k) for k in same):
            raise ConfigError(
                f"{folder} {why}, which did not record all its options; {again} and the options you chose)"
            )
    say(f"{folder} {why}; preparing it again from {source} with its options ...")
    prepare_source(source, folder, tokenizer, **options)
    return folder
