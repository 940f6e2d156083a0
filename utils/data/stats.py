"""Token statistics of a prepared split, the packed-sequence counts of each packing strategy, and their histogram.

The bfd counts are those of TRL 1.x's ``pack_dataset`` on the split as written: it packs each ``datasets.map`` batch
on its own, in the split's order (``tests/test_data_stats.py`` checks the bins, row for row, against it).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from pathlib import Path

import numpy as np

MAX_LENGTH = 2048
PACK_BATCH_ROWS = 1000  # datasets.Dataset.map's default batch_size, the unit TRL's pack_dataset packs


def token_stats(lengths, max_length: int = MAX_LENGTH) -> dict:
    """Dialogue count, token totals and percentiles, the share over ``max_length`` and packed-sequence counts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        keys = """dialogues total_tokens share_over_max_length dialogues_truncated_by_bfd tokens_truncated_by_bfd
            packed_sequences_wrapped packed_sequences_bfd packed_sequences_bfd_split""".split()
        return {**dict.fromkeys(keys, 0), "share_over_max_length": 0.0, "max_length": max_length}
    over, total = np.maximum(lengths - max_length, 0), int(lengths.sum())
    return {
        "dialogues": int(lengths.size),
        "total_tokens": total,
        "mean_tokens": round(float(lengths.mean()), 1),
        "median_tokens": int(np.median(lengths)),
        "p95_tokens": int(np.percentile(lengths, 95)),
        "max_tokens": int(lengths.max()),
        "max_length": max_length,
        "share_over_max_length": round(float((lengths > max_length).mean()), 4),
        # bfd truncates a dialogue to max_length; bfd_split and wrapped keep every token
        "dialogues_truncated_by_bfd": int((over > 0).sum()),
        "tokens_truncated_by_bfd": int(over.sum()),
        "share_of_tokens_truncated_by_bfd": round(float(over.sum() / total), 5),
        # wrapped: one stream cut every max_length tokens, as the card's TRL 0.7.x did (close to packing_strategy card)
        "packed_sequences_wrapped": math.ceil(total / max_length),
        "packed_sequences_bfd": packed_sequences(lengths, max_length, split=False),
        "packed_sequences_bfd_split": packed_sequences(lengths, max_length, split=True),
    }


def packed_sequences(lengths, max_length: int, split: bool) -> int:
    """How many rows TRL's ``pack_dataset`` makes with ``bfd`` (dialogues truncated) or ``bfd_split`` (cut in pieces).
    Full pieces are counted, not packed: memory never grows with ``max_length`` (as TRL's segment tree does)."""
    total = 0
    for start in range(0, len(lengths), PACK_BATCH_ROWS):
        batch = np.asarray(lengths[start : start + PACK_BATCH_ROWS], dtype=np.int64)
        if split:
            full, rest = int((batch // max_length).sum()), batch % max_length
        else:
            full, rest = int((batch >= max_length).sum()), batch[batch < max_length]
        total += full + len(bfd_bins(rest[rest > 0].tolist(), max_length))
    return total


def bfd_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing packing of one batch as TRL's ``_pack_bfd``: the indices of ``lengths`` in each row, rows in
    the order opened (a length over ``capacity`` counts as ``capacity``). Longest first (ties in input order), each
    to the open row with the least room that fits it (the first to get that room among equals), else to a new row."""
    open_rows: list[tuple] = []  # (room, step it got that room, row) of the rows with room left, sorted
    rows: list[list[int]] = []
    for step, i in enumerate(sorted(range(len(lengths)), key=lambda i: -min(lengths[i], capacity))):
        length = min(lengths[i], capacity)
        k = bisect_left(open_rows, (length,))
        if k < len(open_rows):
            room, _, row = open_rows.pop(k)
        else:
            room, row = capacity, []
            rows.append(row)
        row.append(i)
        if room > length:
            insort(open_rows, (room - length, step, row))
    return rows


def plot_token_histogram(lengths: dict[str, np.ndarray], max_length: int = MAX_LENGTH, path: Path | None = None):
    """Tokens per dialogue, one panel per output split (so the small test split stays visible), on an axis fitted
    to the data; ``max_length`` is drawn where it falls inside, else named in the title. Saved when ``path``."""
    import matplotlib.pyplot as plt

    splits = [(name, np.asarray(n)) for name, n in lengths.items() if len(n)]
    panels = max(1, len(splits))  # no splits: one empty panel
    fig, axes = plt.subplots(panels, 1, figsize=(8, 1.6 + 1.4 * panels), sharex=True, squeeze=False)
    right = 1.05 * max((int(n.max()) for _, n in splits), default=max_length)
    for i, (ax, (name, n)) in enumerate(zip(axes[:, 0], splits, strict=False)):
        ax.hist(n, bins=40, range=(0, right), color=f"C{i}", label=f"{name}: {len(n)} dialogues")
        if max_length <= right:
            ax.axvline(max_length, color="black", linestyle="--", label=f"max_length {max_length}")
        ax.set_ylabel("dialogues")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set(xlim=(0, right), xlabel="tokens per dialogue (Zephyr template, Mistral tokenizer)")
    if max_length > right:
        axes[0, 0].set_title(f"every dialogue fits in max_length {max_length} (off the right edge)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
