"""The streaming pipeline reproduces, row for row, what the in-memory pipeline it replaced wrote on the samples.

``tests/golden/samples.json`` was written by the code before the rewrite (``utils/prepare_data.py`` at 729f54d) from
the command line's output folders: per output split, one SHA-256 per row over all six columns, plus ``report.json``
and the printed lines (the output path written as ``{out}``). It holds the samples as they were then (the pirate
dialogues came later) and today's token ids (the card's ids, the default since, came later too): the test runs on a
copy of those files with ``--tokenization today``, and leaves out what was added since (``ADDED``). The digests of the
two dialogues with runs of spaces (6 rows over the cases) were rewritten when the embedded tokenizer's merges went
back to sentencepiece-score order (issue 28 §4): the old ones are those rows with the ids of a tokenizer with merges
by id, and the token counts did not change.
"""

import hashlib
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "samples.json"
CASES = {
    "200k-auto": "--source data/sample/ultrachat_200k",
    "200k-all": "--source data/sample/ultrachat_200k --filters all",
    "200k-structure-bounds": "--source data/sample/ultrachat_200k --filters structure --min-tokens 63 --max-tokens 208",
    "raw-auto": "--source data/sample/ultrachat_raw/ultrachat_raw.jsonl",
    "raw-all-no-system-turn": "--source data/sample/ultrachat_raw --filters all --no-system-turn",
}
ADDED = {
    "source_fingerprint",
    "tokenization",
    "format",
    "options",
    "tokenizer",
}  # report keys added (or changed) since the golden record
GOLDEN_FILES = ("ultrachat_200k/train_sft.jsonl", "ultrachat_200k/test_sft.jsonl", "ultrachat_raw/ultrachat_raw.jsonl")


def row_digest(row: dict) -> str:
    columns = ("prompt", "prompt_id", "messages", "input_ids", "num_tokens", "num_turns")
    return hashlib.sha256(json.dumps([row[c] for c in columns], ensure_ascii=False).encode("utf-8")).hexdigest()


def record(folder: Path, printed: str) -> dict:
    """What a prepared folder holds, compactly: row digests and features per split, the report, the printed lines."""
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    report = json.loads((folder / "report.json").read_text())
    return {
        "splits": {
            name: {"features": str(split.features), "rows": [row_digest(r) for r in split]}
            for name, split in loaded.items()
        },
        "report": {k: v for k, v in report.items() if k not in ADDED},
        "printed": printed.replace(str(folder), "{out}").replace("; token ids: today", ""),
    }


@pytest.mark.parametrize("case", CASES)
def test_streaming_output_matches_the_golden_record(case, tmp_path, capsys, monkeypatch):
    import shutil

    from utils import SAMPLE_DIR
    from utils.prepare_data import main

    for name in GOLDEN_FILES:  # the samples as they were, at the same relative paths
        (tmp_path / "data/sample" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_DIR / name, tmp_path / "data/sample" / name)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main([*CASES[case].split(), "--tokenization", "today", "--out", str(out), "--no-progress"]) == 0
    got = record(out, capsys.readouterr().out)
    expected = json.loads(GOLDEN.read_text())[case]
    expected["report"] = {k: v for k, v in expected["report"].items() if k not in ADDED}
    assert got["report"] == expected["report"]
    assert got["printed"] == expected["printed"]
    assert got["splits"] == expected["splits"]
