"""Memory and time of ``--assistant_only_loss true``'s mask column at scale (``utils.training.with_assistant_masks``).

    python bench/assistant_masks.py                  # 20,000 rows x 1,400 tokens: a tenth of ultrachat_200k's tokens
    python bench/assistant_masks.py --rows 2000      # a quick look

Writes synthetic prepared rows (the Zephyr markers around random token ids, ultrachat_200k's ~1,400 tokens per
dialogue) to a temporary folder, loads them memory-mapped as training does, builds the mask column in a child
process, and prints its time, the anonymous memory the child holds afterwards (the column and what the build
left; the memory-mapped rows are not counted) and the masked share. ``--lists`` measures the earlier way (Python
lists of every row's ids and mask) for comparison.
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
    masked = with_assistant_masks({"train": rows}, tokenizer)["train"]
seconds, held = time.perf_counter() - start, anonymous_mib() - before
first = min(100, rows.num_rows)
share = sum(sum(m) for m in masked.select(range(first))["assistant_masks"]) / sum(map(len, rows[:first]["input_ids"]))
print(f"{sys.argv[2]:7s} {rows.num_rows:,} rows: {seconds:.1f} s, {held:,.0f} MiB more anonymous memory; "
      f"{share:.1%} of the tokens are the assistant's")
"""


def synthetic_rows(folder: Path, rows: int, length: int = 1400) -> None:
    """``rows`` prepared rows of ``length`` token ids: user and assistant turns in the Zephyr template."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    user, assistant = [2, 28705, 13, 28789, 28766, 1838, 28766, 28767, 13], [2, 28705, 13, 28789, 28766, 489, 11143]
    assistant += [28766, 28767, 13]

    def generate():
        for _ in range(rows):
            ids = [1]
            while len(ids) < length:
                ids += user + rng.integers(300, 32000, 40).tolist() + assistant + rng.integers(300, 32000, 120).tolist()
            yield {"input_ids": ids[:length]}

    datasets.Dataset.from_generator(generate).save_to_disk(str(folder))


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
