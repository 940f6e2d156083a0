"""Token statistics and packed-sequence counts: the bins are TRL's own, checked row for row against pack_dataset."""

import random
import tracemalloc

import pytest
from datasets import Dataset
from trl import pack_dataset

from utils.data.stats import PACK_BATCH_ROWS, bfd_bins, packed_sequences, token_stats


def trl_rows(lengths, max_length, strategy):
    """The dialogues in each row TRL packs (each dialogue's token ids are its own index), and the tokens kept."""
    dataset = Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
    rows, tokens = [], 0
    for row in pack_dataset(dataset, max_length, strategy):
        starts = [sum(row["seq_lengths"][:k]) for k in range(len(row["seq_lengths"]))]
        rows.append([row["input_ids"][s] for s in starts])
        tokens += len(row["input_ids"])
    return rows, tokens


def our_rows(lengths, max_length, split):
    """``bfd_bins`` batch by batch, on the dialogues (bfd) or their ``max_length`` pieces (bfd_split)."""
    rows = []
    for start in range(0, len(lengths), PACK_BATCH_ROWS):
        batch = range(start, min(start + PACK_BATCH_ROWS, len(lengths)))
        pieces = [(i, min(max_length, lengths[i] - s)) for i in batch for s in range(0, lengths[i], max_length)]
        if not split:
            pieces = [(i, lengths[i]) for i in batch]
        rows += [[pieces[k][0] for k in row] for row in bfd_bins([n for _, n in pieces], max_length)]
    return rows


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_the_bins_are_trls(strategy):
    rng = random.Random(strategy)
    max_length = 64
    # 2,500 dialogues (three batches): many ties, some exactly max_length, some several times longer
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(30, 64), 64, rng.randint(65, 200)]) for _ in range(2500)]
    expected, kept_tokens = trl_rows(lengths, max_length, strategy)
    split = strategy == "bfd_split"
    assert our_rows(lengths, max_length, split) == expected  # same dialogues in the same rows, in the same order
    assert packed_sequences(lengths, max_length, split) == len(expected)
    stats = token_stats(lengths, max_length)
    assert stats[f"packed_sequences_{strategy}"] == len(expected)
    if split:
        assert kept_tokens == sum(lengths)  # bfd_split keeps every token
    else:
        assert kept_tokens == stats["total_tokens"] - stats["tokens_truncated_by_bfd"]
        assert stats["dialogues_truncated_by_bfd"] == sum(n > max_length for n in lengths)


def test_token_stats_by_hand():
    stats = token_stats([100, 2048, 2100, 5000], 2048)
    assert (stats["dialogues_truncated_by_bfd"], stats["tokens_truncated_by_bfd"]) == (2, 52 + 2952)
    assert stats["packed_sequences_bfd"] == 4  # 2048, 2048 (2100 cut), 2048 (5000 cut), 100
    assert stats["packed_sequences_bfd_split"] == 5  # four pieces of 2048 alone, then 904 + 100 + 52 together
    assert stats["packed_sequences_wrapped"] == 5  # ceil(9248 / 2048): the card's one stream
    assert bfd_bins([7, 6, 3, 2, 2], 10) == [[0, 2], [1, 3, 4]]  # 7+3, 6+2+2
    assert bfd_bins([25, 1, 1], 10) == [[0], [1, 2]]  # 25 truncated to a full row
    assert token_stats([], 2048)["packed_sequences_bfd"] == 0


def test_memory_does_not_grow_with_max_length():
    tracemalloc.start()
    try:
        stats = token_stats([120, 80, 300] * 100, 100_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats["packed_sequences_bfd"] == stats["packed_sequences_bfd_split"] == 1
    assert peak < 1_000_000  # bytes: a few per dialogue, none per position of max_length
