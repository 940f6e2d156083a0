"""Benchmark: how fast does notebook 01's pipeline prepare UltraChat-shaped data, against two yardsticks?

    python bench/prepare_data.py [--rows 4000]

- floor: plain batch tokenization of the final rendered text (``tokenizer(texts)``), nothing else;
- ours: ``utils.prepare_data.prepare`` on the raw rows (filters + truecasing + template + tokenization) plus packing;
- TRL: ``SFTTrainer._prepare_dataset`` (TRL's own preparation: EOS, tokenization, labels, BFD packing) of the same
  dialogues, given as rendered text (the card's way) and as messages (conversational).

The corpus is synthetic, shaped like ultrachat_200k (about 3 turn pairs and 1,400 tokens per dialogue, ~5% needing
truecasing, a few disclaimers and duplicates). Prints one table and the extrapolation to all of ultrachat_200k.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.assets import load_tokenizer  # noqa: E402
from utils.prepare_data import pack_wrapped, prepare, render  # noqa: E402

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


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(8, 22))
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def paragraph(rng: random.Random, sentences: int, lowercase: bool) -> str:
    text = " ".join(sentence(rng) for _ in range(sentences))
    if lowercase:  # "Hello. how are you?" style: what the truecasing fixes
        text = text.replace(". T", ". t", 2).replace(". A", ". a", 2)
    return text


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[int, dict, None]]:
    """UltraChat-like rows in the 200k schema: 3 turn pairs of ~1,400 tokens in all, with a few to filter."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lowercase = rng.random() < 0.05
        messages = []
        for turn in range(3):
            messages.append({"role": "user", "content": paragraph(rng, rng.randint(1, 3), False) + f" ({i}.{turn})"})
            messages.append({"role": "assistant", "content": paragraph(rng, rng.randint(20, 28), lowercase)})
        if rng.random() < 0.01:
            messages[1]["content"] = "As an AI language model, I " + messages[1]["content"]
        rows.append((i + 1, {"prompt": messages[0]["content"], "messages": messages}, None))
    for j in range(0, n, 200):  # 0.5% duplicate prompts
        rows[j] = (j + 1, rows[max(j - 1, 0)][1], None)
    return rows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs for each measurement")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(None)
    rows = synthetic_rows(args.rows)

    ours_s, prepared = timed(lambda: _ours(rows, tokenizer), args.repeat)
    kept = prepared.rows["train"]
    ids = kept["input_ids"]
    tokens = sum(kept["num_tokens"])
    texts = [render(m, tokenizer.eos_token) for m in kept["messages"]]
    floor_s, floor_ids = timed(lambda: tokenizer(texts)["input_ids"], args.repeat)
    assert floor_ids == ids, "the pipeline's token ids differ from plain tokenization of the rendered text"
    backend = tokenizer.backend_tokenizer
    fast_s, _ = timed(lambda: [e.ids for e in backend.encode_batch_fast(texts)], args.repeat)

    # TRL, given the rendered text without our trailing EOS (TRL appends it), as the handbook fed it.
    plain = [t[: -len(tokenizer.eos_token)] for t in texts]
    text_ds = datasets.Dataset.from_dict({"text": plain})
    chat_ds = datasets.Dataset.from_dict({"messages": kept["messages"]})
    trl_text_s, _ = timed(lambda: trl_prepare(text_ds, tokenizer, True, 2048), args.repeat)
    trl_chat_s, _ = timed(lambda: trl_prepare(chat_ds, tokenizer, True, 2048), args.repeat)
    trl_ids = trl_prepare(text_ds, tokenizer, False, None)["input_ids"]
    same = trl_ids == ids

    mean = tokens / len(ids)
    print(
        f"corpus: {args.rows} synthetic dialogues, {len(ids)} kept, {tokens:,} tokens "
        f"({mean:,.0f} per dialogue), best of {args.repeat}"
    )
    print(f"{'pipeline':58s} {'seconds':>8s} {'M tok/s':>8s} {'vs floor':>9s} {'vs no-offsets floor':>20s}")
    for name, seconds in [
        ("floor: tokenizer(rendered texts)", floor_s),
        ("floor, no offsets: backend.encode_batch_fast(texts)", fast_s),
        ("ours: filters+truecase+template+tokenize+pack", ours_s),
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
    total = ULTRACHAT_200K_ROWS * mean
    print(
        f"all of ultrachat_200k (~{ULTRACHAT_200K_ROWS:,} dialogues, ~{total / 1e6:.0f}M tokens at this length): "
        f"ours ~{total / (tokens / ours_s) / 60:.1f} min, TRL (text) ~{total / (tokens / trl_text_s) / 60:.1f} min"
    )


def _ours(rows, tokenizer):
    prepared = prepare({"train_sft": rows}, tokenizer, progress=False)
    pack_wrapped(prepared.rows["train"]["input_ids"])
    return prepared


if __name__ == "__main__":
    main()
