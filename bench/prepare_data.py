"""Benchmark: how fast, and in how much memory, does notebook 01's pipeline prepare UltraChat-shaped data?

    python bench/prepare_data.py [--rows 4000]                 # against the tokenizer floor and TRL's preparation
    python bench/prepare_data.py --scale 20000 60000 230975    # the command on Hub-layout Parquet, at scale

Comparison (``--rows``), in this process:

- floor: plain batch tokenization of the final rendered text (``tokenizer(texts)``), nothing else;
- ours: ``utils.data.pipeline.prepare`` on the raw rows (filters + truecasing + template + tokenization + statistics)
  writing its output folder;
- TRL: ``SFTTrainer._prepare_dataset`` (TRL's own preparation: EOS, tokenization, labels, BFD packing) of the same
  dialogues, given as rendered text (the card's way) and as messages (conversational).

Scale (``--scale N ...``): N dialogues written as a Hub-layout folder (``data/train_sft-0000i-of-00003.parquet`` and
``data/test_sft-00000-of-00001.parquet``, 10% test as in ultrachat_200k), then ``python -m utils.prepare_data`` run on
it as a subprocess (wall time, tokens/s, peak RSS of that process), and the floor measured on the same dialogues in
another subprocess: their rendered text tokenized in chunks by the Rust backend's batch call, timing only that call.

The corpus is synthetic, shaped like ultrachat_200k (3 turn pairs and about 1,400 tokens per dialogue, ~5% needing
truecasing, 1% disclaimers, 0.5% duplicate prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import REPO_ROOT  # noqa: E402

ULTRACHAT_200K_ROWS = 207_865 + 23_110  # train_sft + test_sft
WORDS = (
    "the of and to in is that for it as with was on be by this are or at from but not have an they which one you "
    "were all we can her has there been if more when will would who so no about many time people water other "
    "system process data model energy market light number world small large important different example however "
    "because through between during without within important several various provide include increase reduce "
    "develop support describe explain consider create change result effect research history culture economy "
    "health student teacher country community government technology science practice design method approach "
    "analysis quality resource structure function problem solution benefit challenge opportunity strategy "
    "environment experience knowledge language literature character story music painting garden river mountain "
    "forest ocean city village travel recipe kitchen flavour ingredient exercise training balance muscle "
    "software program code variable function library server network security password customer product"
).split()


def synthetic_dialogues(n: int, seed: int = 0) -> Iterator[dict]:
    """UltraChat-like rows in the 200k schema: 3 turn pairs of ~1,400 tokens in all, with a few to filter.

    Sentences come from a pool of 20,000 random ones, so that millions of dialogues are written in seconds.
    """
    rng = random.Random(seed)
    pool = [" ".join(rng.choices(WORDS, k=rng.randint(8, 22))).capitalize() + rng.choice(".?!..") for _ in range(20000)]
    previous = None
    for i in range(n):
        lowercase = rng.random() < 0.05
        messages = []
        for turn in range(3):
            user = " ".join(rng.choices(pool, k=rng.randint(1, 3))) + f" ({i}.{turn})"
            answer = " ".join(rng.choices(pool, k=rng.randint(20, 28)))
            if lowercase:  # "Hello. how are you?" style: what the truecasing fixes
                answer = answer.replace(". T", ". t", 2).replace(". A", ". a", 2)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.01:
            messages[1]["content"] = "As an AI language model, I " + messages[1]["content"]
        if i % 200 == 0 and previous is not None:  # 0.5% duplicate prompts
            messages = previous
        previous = messages
        yield {"prompt": messages[0]["content"], "prompt_id": "", "messages": messages}


# --- comparison ----------------------------------------------------------------------------------------------------
def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def trl_prepare(dataset, tokenizer, packing: bool, max_length: int | None):
    """TRL's own preparation (``SFTTrainer._prepare_dataset``) without building a model or a trainer."""
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_length=max_length,
            packing=packing,
            packing_strategy="bfd",
            bf16=False,
            report_to=[],
            shuffle_dataset=False,
        )
    stub = SimpleNamespace(
        _tokenizer=tokenizer, chat_template=None, completion_only_loss=None, _is_vision_dataset=False, args=args
    )
    return SFTTrainer._prepare_dataset(stub, dataset, tokenizer, args, packing, None, "train")


def compare(rows: int, repeat: int) -> None:
    import datasets

    from utils.assets import load_tokenizer
    from utils.data.pipeline import prepare
    from utils.data.sources import Split
    from utils.data.template import render

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(None)
    dialogues = list(synthetic_dialogues(rows))
    split = Split(lambda: ((i, row, None) for i, row in enumerate(dialogues, start=1)), len(dialogues))
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, _ = timed(lambda: prepare({"train_sft": split}, tokenizer, Path(tmp) / "out"), repeat)
        kept = datasets.load_from_disk(str(Path(tmp) / "out"))["train"]
        ids, messages = kept["input_ids"][:], kept["messages"][:]
    tokens = sum(len(x) for x in ids)
    texts = [render(m, tokenizer.eos_token) for m in messages]
    floor_s, floor_ids = timed(lambda: tokenizer(texts)["input_ids"], repeat)
    assert floor_ids == ids, "the pipeline's token ids differ from plain tokenization of the rendered text"
    backend = tokenizer.backend_tokenizer
    fast_s, _ = timed(lambda: [e.ids for e in backend.encode_batch_fast(texts)], repeat)

    # TRL, given the rendered text without our trailing EOS (TRL appends it), as the handbook fed it.
    plain = [t[: -len(tokenizer.eos_token)] for t in texts]
    text_ds = datasets.Dataset.from_dict({"text": plain})
    chat_ds = datasets.Dataset.from_dict({"messages": messages})
    trl_text_s, _ = timed(lambda: trl_prepare(text_ds, tokenizer, True, 2048), repeat)
    trl_chat_s, _ = timed(lambda: trl_prepare(chat_ds, tokenizer, True, 2048), repeat)
    same = trl_prepare(text_ds, tokenizer, False, None)["input_ids"][:] == ids

    print(
        f"corpus: {rows} synthetic dialogues, {len(ids)} kept, {tokens:,} tokens "
        f"({tokens / len(ids):,.0f} per dialogue), best of {repeat}"
    )
    print(f"{'pipeline':58s} {'seconds':>8s} {'M tok/s':>8s} {'vs floor':>9s} {'vs no-offsets floor':>20s}")
    for name, seconds in [
        ("floor: tokenizer(rendered texts)", floor_s),
        ("floor, no offsets: backend.encode_batch_fast(texts)", fast_s),
        ("ours: filters+truecase+template+tokenize+stats+write", ours_s),
        ("TRL 1.x _prepare_dataset, text column (EOS+tokenize+bfd)", trl_text_s),
        ("TRL 1.x _prepare_dataset, messages column (chat template)", trl_chat_s),
    ]:
        print(
            f"{name:58s} {seconds:8.2f} {tokens / seconds / 1e6:8.2f} {seconds / floor_s:8.2f}x "
            f"{seconds / fast_s:19.2f}x"
        )
    print(
        f"ours is {trl_text_s / ours_s:.1f}x faster than TRL (text) and {trl_chat_s / ours_s:.1f}x than TRL "
        f"(messages); token ids identical to TRL (text): {same}"
    )


# --- scale ---------------------------------------------------------------------------------------------------------
def write_hub_layout(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` dialogues as ultrachat_200k's Hub files: 3 train_sft shards and 1 test_sft shard (10% of the rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    n_test = round(n * 23_110 / ULTRACHAT_200K_ROWS)
    bounds = [0, *((n - n_test) * k // 3 for k in (1, 2, 3)), n]
    names = [f"train_sft-0000{k}-of-00003" for k in range(3)] + ["test_sft-00000-of-00001"]
    rows = synthetic_dialogues(n, seed)
    for name, start, end in zip(names, bounds[:-1], bounds[1:], strict=True):
        with pq.ParquetWriter(folder / "data" / f"{name}.parquet", _SCHEMA()) as writer:
            for chunk in range(start, end, 1000):
                writer.write_table(pa.Table.from_pylist([next(rows) for _ in range(min(1000, end - chunk))], _SCHEMA()))


def _SCHEMA():  # noqa: N802 - a constant built on demand (pyarrow imported lazily)
    import pyarrow as pa

    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    return pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(message))])


FLOOR = """
import sys, time, pyarrow.parquet as pq
from pathlib import Path
from utils.assets import load_tokenizer
from utils.data.template import render
backend = load_tokenizer(None).backend_tokenizer
if sys.argv[2] == "no-cache":
    backend.model._resize_cache(0)
seconds = cpu = tokens = 0
for path in sorted(Path(sys.argv[1]).glob("data/*.parquet")):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=500, columns=["messages"]):
        texts = [render(m) for m in batch.column("messages").to_pylist()]
        start, start_cpu = time.perf_counter(), time.process_time()
        ids = [e.ids for e in backend.encode_batch_fast(texts)]
        seconds, cpu = seconds + time.perf_counter() - start, cpu + time.process_time() - start_cpu
        tokens += sum(map(len, ids))
print(seconds, cpu, tokens)
"""


def measured(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """Run ``command``; its wall seconds, CPU seconds, peak RSS in GB (its own, from wait4) and output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e9, output


def scale(sizes: list[int]) -> None:
    """The command at each size against two floors: the tokenizer as loaded, and the same without its BPE cache
    (which the pipeline leaves out: whole dialogues are never looked up twice). Wall and CPU seconds (CPU time is
    what other load on the machine distorts least), peak RSS, and the load average around each measurement."""
    print(
        f"{'dialogues':>10s} {'tokens':>12s} {'wall s':>7s} {'cpu s':>7s} {'M tok/s':>8s} {'peak RSS GB':>11s} "
        f"{'floor wall/cpu s':>16s} {'no-cache floor':>14s} {'vs floors: wall':>16s} {'cpu':>11s}  load before/after"
    )
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=REPO_ROOT / "runs") as tmp:
            source, out = Path(tmp) / "ultrachat_200k", Path(tmp) / "out"
            write_hub_layout(source, n)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(Path(tmp) / "cache")}
            cli = [sys.executable, "-m", "utils.prepare_data", "--source", str(source), "--out", str(out)]
            load_before = os.getloadavg()[0]
            wall, cpu, rss, _ = measured([*cli, "--no-progress"], env)
            tokens = sum(s["total_tokens"] for s in json.loads((out / "report.json").read_text())["outputs"].values())
            print(f"  {n:,}: the command took {wall:.1f} s ({cpu:.1f} s CPU), peak RSS {rss:.2f} GB", file=sys.stderr)
            floors = []
            for kind in ("as-loaded", "no-cache"):
                _, _, _, floor_out = measured([sys.executable, "-c", FLOOR, str(source), kind], env)
                floor_wall, floor_cpu, floor_tokens = (float(x) for x in floor_out.split()[-3:])
                share = tokens / floor_tokens  # the floor tokenized every row, the pipeline only the kept ones
                floors.append((floor_wall * share, floor_cpu * share))
            (fw, fc), (nw, nc) = floors
            print(
                f"{n:>10,} {tokens:>12,} {wall:>7.1f} {cpu:>7.1f} {tokens / wall / 1e6:>8.2f} {rss:>11.2f} "
                f"{fw:>8.1f}/{fc:<7.1f} {nw:>6.1f}/{nc:<7.1f} {wall / fw:>7.2f}x/{wall / nw:.2f}x "
                f"{cpu / fc:>5.2f}x/{cpu / nc:.2f}x  {load_before:.1f}/{os.getloadavg()[0]:.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="dialogues of the comparison")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs for each measurement")
    parser.add_argument("--scale", type=int, nargs="+", help="dialogue counts for the at-scale measurement")
    args = parser.parse_args()
    if args.scale:
        scale(args.scale)
    else:
        compare(args.rows, args.repeat)


if __name__ == "__main__":
    main()
