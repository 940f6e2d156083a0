"""Memory and time of ``--assistant_only_loss true``'s mask column at scale (``utils.training.with_assistant_masks``).

    python bench/assistant_masks.py                  # 20,000 rows x 1,400 tokens: a tenth of ultrachat_200k's tokens
    python bench/assistant_masks.py --rows 2000      # a quick look

Writes synthetic prepared rows (dialogues of random words, about ultrachat_200k's ~1,400 tokens each, with their
card ids and a report as notebook 01 writes them) to a temporary folder, loads them memory-mapped as training does,
builds the mask column in a child process (each row tokenized again with its answers placed from the message
boundaries), and prints its time, the anonymous memory the child holds afterwards (the column and what the build
left; the memory-mapped rows are not counted) and the masked share. ``--lists`` measures an earlier way (Python
lists of every row's mask, found by searching the ids for the assistant's marker) for comparison.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHILD = """
import sys, time
from pathlib import Path
import datasets
from utils.assets import load_tokenizer
from utils.training import assistant_header, assistant_mask, with_assistant_masks

def anonymous_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) / 1024

tokenizer = load_tokenizer(None)
rows = datasets.load_from_disk(sys.argv[1])
before, start = anonymous_mib(), time.perf_counter()
if sys.argv[2] == "lists":
    header, eos = assistant_header(tokenizer), tokenizer.eos_token_id
    masked = rows.add_column("assistant_masks", [assistant_mask(ids, header, eos) for ids in rows["input_ids"]])
else:
    masked = with_assistant_masks({"train": rows}, tokenizer, Path(sys.argv[1]))["train"]
seconds, held = time.perf_counter() - start, anonymous_mib() - before
first = min(100, rows.num_rows)
share = sum(sum(m) for m in masked.select(range(first))["assistant_masks"]) / sum(map(len, rows[:first]["input_ids"]))
print(f"{sys.argv[2]:7s} {rows.num_rows:,} rows: {seconds:.1f} s, {held:,.0f} MiB more anonymous memory; "
      f"{share:.1%} of the tokens are the assistant's")
"""


def synthetic_rows(folder: Path, rows: int, turns: int = 4) -> None:
    """``rows`` prepared rows: dialogues of ``turns`` questions (about 40 tokens) and answers (about 300) of random
    words, their card ids, and a ``report.json`` naming how they were tokenized."""
    import json

    import datasets
    import numpy as np

    from utils.assets import load_tokenizer
    from utils.data.template import tokenize_dialogues

    tokenizer, rng = load_tokenizer(None), np.random.default_rng(0)
    words = "the a ship sails north and crew sings of gold while storm comes over sea to port".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words, n))

    def generate():
        for start in range(0, rows, 500):
            dialogues = [
                [
                    {"role": r, "content": text(30 if r == "user" else 240)}
                    for _ in range(turns)
                    for r in ("user", "assistant")
                ]
                for _ in range(min(500, rows - start))
            ]
            for messages, ids in zip(dialogues, tokenize_dialogues(tokenizer, dialogues), strict=True):
                yield {"messages": messages, "input_ids": ids}

    datasets.Dataset.from_generator(generate).save_to_disk(str(folder))
    (folder / "report.json").write_text(json.dumps({"system_turn": True, "tokenization": "card"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/assistant_masks.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--lists", action="store_true", help="also measure Python lists of every row (the old way)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        print("error: --rows must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rows"
        synthetic_rows(folder, args.rows)
        for way in ("column", "lists") if args.lists else ("column",):
            done = subprocess.run([sys.executable, "-c", CHILD, str(folder), way], cwd=Path(__file__).parent.parent)
            if done.returncode:
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
