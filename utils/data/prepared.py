"""The prepared copy of a training source (notebook 01's pipeline run on it) that a run trains on, cached under
``runs/data/``; light to import, so that a process that only needs the data (``utils.sharding``) skips the training
stack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from utils import RUNS_DIR, ConfigError, say

DATA_CACHE = RUNS_DIR / "data"


def prepared_dataset(source: str, tokenizer, revision: str | None = None) -> Path:
    """The prepared folder to train on: ``source`` itself when notebook 01 wrote it, else its copy prepared by
    notebook 01's pipeline under ``runs/data/``, keyed by the source's content (or Hub id and revision) and the
    tokenizer. A changed source is prepared again, and the line printed says so."""
    from utils.data.output import is_current
    from utils.data.pipeline import prepare_source
    from utils.data.sources import local_path, source_fingerprint

    path = local_path(source)
    if path is not None and (path / "dataset_dict.json").is_file():
        return path if is_current(path) else _prepared_again(path, tokenizer)
    key = hashlib.sha256(f"{source_fingerprint(source, revision)} {tokenizer.name_or_path}".encode()).hexdigest()
    out = DATA_CACHE / f"{Path(source.rstrip('/')).name.replace('/', '__')}-{key[:12]}"
    if is_current(out):
        return out
    earlier = sorted(DATA_CACHE.glob(f"{out.name[:-13]}-*")) if DATA_CACHE.is_dir() else []
    changed = " (it changed since it was last prepared)" if earlier else ""
    say(f"Preparing {source} into {out} (notebook 01's pipeline){changed} ...")
    prepare_source(source, out, tokenizer, revision=revision)
    return out


def _prepared_again(folder: Path, tokenizer) -> Path:
    """A folder notebook 01 wrote with an earlier release (another format: no card ids, say): prepared again, in
    place, from the source its report names, with the options it was prepared with; ConfigError when that cannot be
    done (not this tool's folder, or its source is gone)."""
    from utils.data.output import is_own_output
    from utils.data.pipeline import prepare_source
    from utils.data.sources import local_path

    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        report = {}
    source = report.get("source")
    source_path = local_path(source) if isinstance(source, str) and source else None
    if not is_own_output(folder) or source_path is None or not source_path.exists():
        raise ConfigError(
            f"{folder} was prepared by an earlier release of this collection; prepare it again with notebook 01 "
            f"(or python -m utils.prepare_data --out {folder})"
        )
    say(f"{folder} was prepared by an earlier release; preparing it again from {source} ...")
    options = {k: report[k] for k in ("system_turn", "tokenization") if k in report}
    prepare_source(source, folder, tokenizer, **options)
    return folder
