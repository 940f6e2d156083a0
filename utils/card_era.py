"""The card's era in code (``docs/card_era.md`` has the sources): what produced mistral-7b-sft-beta in October 2023
(transformers 4.35.0.dev0, tokenizers 0.14.0, alignment-handbook a0b8d49, TRL 0.7.x, 16 GPUs) where today differs:
its token ids (a ``▁`` before every piece between special tokens, merges by sentencepiece score), TRL 0.7.x's
``ConstantLengthDataset`` packing, and the 4.35 Trainer's stop when the chunks ran out (step 272 of 406 planned)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from collections import namedtuple
from collections.abc import Sequence

import numpy as np

from utils.assets import sentencepiece_file, sentencepiece_merges

SEQ_LENGTH = 2048  # max_seq_length of recipes/zephyr-7b-beta/sft/config_full.yaml
NUM_OF_SEQUENCES = 1024  # SFTTrainer's default in TRL 0.7.x; the handbook does not set it
CHARS_PER_TOKEN = 3.6  # SFTTrainer's default in TRL 0.7.x: a constant, never estimated from the data


# --- token ids ---------------------------------------------------------------------------------------------------
@functools.cache  # one backend per tokenizer and pipeline: _tokenize_safely asks for one per message
def era_backend(tokenizer, scheme: str = "card", text_specials: bool = False, first: bool = True):
    """A copy of ``tokenizer``'s Rust backend with the card's pipeline (merges by score for Mistral's v1 vocabulary) or
    today's (prepend ``"first"`` or ``"never"``), whatever the tokenizer's flags; ``text_specials``: specials as text"""
    from tokenizers import Tokenizer

    if scheme not in ("card", "today"):
        raise ValueError(f"scheme must be one of card, today, got {scheme!r}")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for added in state["added_tokens"]:
        added["normalized"] = False  # split at special tokens before normalising, as the 2023 file did
    if scheme == "card":  # the Hub tokenizer.json of 2023 (transformers 4.34/4.35): "▁" before every piece
        steps = [dict(type="Prepend", prepend="▁"), dict(type="Replace", pattern={"String": " "}, content="▁")]
        state["normalizer"], state["pre_tokenizer"] = {"type": "Sequence", "normalizers": steps}, None
        vocab, merges = sentencepiece_merges(str(sentencepiece_file()))
        if state["model"].get("type") == "BPE" and state["model"]["vocab"] == vocab:
            state["model"]["merges"] = merges
    else:  # transformers 5.x with legacy=False: "▁" before the first piece of the text only
        prepend = "first" if first else "never"
        state["normalizer"] = None
        state["pre_tokenizer"] = dict(type="Metaspace", replacement="▁", prepend_scheme=prepend, split=False)
    backend = Tokenizer.from_str(json.dumps(state))
    backend.encode_special_tokens = text_specials
    return backend


def render_text(messages: Sequence[dict], eos: str = "</s>") -> str:
    """The card's Zephyr template (handbook a0b8d49's ``DEFAULT_CHAT_TEMPLATE``): no BOS, no generation prompt."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)


def tokenize_dialogues(tokenizer, dialogues: list[list[dict]], scheme="card", text_specials=None, answers=False):
    """BOS + ``render_text`` + EOS per dialogue, in the card's ids or today's; special-token text in a message is a
    control token under ``card`` (as the card's tokenizer did), else text (``text_specials``). With ``answers``,
    ``(ids, masks)``: 1 on each answer and its EOS, by offsets (a marker's text in a message masks nothing)."""
    if text_specials is None:
        text_specials = scheme != "card"
    eos, backend = tokenizer.eos_token, era_backend(tokenizer, scheme)
    specials = [t for t in tokenizer.all_special_tokens if t] if text_specials else []
    ids, masks = [None] * len(dialogues), [None] * len(dialogues)
    plain = [i for i, d in enumerate(dialogues) if not any(t in m["content"] for m in d for t in specials)]
    texts = [render_text(dialogues[i], eos) + eos for i in plain]
    for i, encoding in zip(plain, (backend.encode_batch if answers else backend.encode_batch_fast)(texts), strict=True):
        ids[i] = encoding.ids
        if answers:
            masks[i] = _in_spans(encoding.offsets, _answer_spans(dialogues[i], eos))
    for i, dialogue in enumerate(dialogues):
        if ids[i] is None:
            ids[i], masks[i] = _tokenize_safely(tokenizer, dialogue, scheme)
    return (ids, masks) if answers else ids


def _answer_spans(messages: Sequence[dict], eos: str) -> list[tuple[int, int]]:
    """Where ``render_text(messages) + eos`` puts each assistant message's content and the EOS after it."""
    starts = [0, *itertools.accumulate(text_length([m], eos) for m in messages)]  # each "<|role|>\n" content EOS "\n"
    turns = zip(messages, itertools.pairwise(starts), strict=True)
    return [(at + len(f"<|{m['role']}|>\n"), end - 1) for m, (at, end) in turns if m["role"] == "assistant"]


def _in_spans(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose text starts inside one of ``spans`` (a BOS added by the tokenizer has no text)."""
    return [int(end > start and any(a <= start < b for a, b in spans)) for start, end in offsets]


def _tokenize_safely(tokenizer, messages: Sequence[dict], scheme: str) -> tuple[list[int], list[int]]:
    """Ids and answer mask from the pieces between the template's EOS markers, encoded one by one with special-token
    text kept as text. Card: every piece gets the leading ``▁`` (the normaliser ran per piece); today: the first."""
    ids, mask = [tokenizer.bos_token_id], [0]
    for i, m in enumerate([*messages, None]):
        piece = "\n" if m is None else ("\n" if i else "") + f"<|{m['role']}|>\n{m['content']}"
        answer = m is not None and m["role"] == "assistant"
        backend = era_backend(tokenizer, scheme, text_specials=True, first=(i == 0 or scheme == "card"))
        encoding = backend.encode(piece, add_special_tokens=False)
        ids += encoding.ids
        mask += _in_spans(encoding.offsets, [(len(piece) - len(m["content"]), len(piece))] if answer else [])
        ids.append(tokenizer.eos_token_id)
        mask.append(int(answer))
    return ids, mask


# --- packing -----------------------------------------------------------------------------------------------------
def text_length(messages: Sequence[dict], eos: str = "</s>") -> int:
    """``len(render_text(messages, eos))``: the characters ConstantLengthDataset's buffer counted."""
    return sum(len(m["role"]) + len(m["content"]) + len(eos) + 6 for m in messages)


def max_buffer_size(seq_length=SEQ_LENGTH, num_of_sequences=NUM_OF_SEQUENCES, chars_per_token=CHARS_PER_TOKEN) -> float:
    """The character budget of one buffer: ``seq_length * chars_per_token * num_of_sequences`` (7,549,747.2)."""
    return seq_length * chars_per_token * num_of_sequences


def buffer_spans(char_lengths: Sequence[int], max_buffer: float) -> list[tuple[int, int]]:
    """``[start, end)`` of each buffer: rows are added while it holds fewer than ``max_buffer`` characters, so a
    buffer ends with the row that reaches it (the empty last buffer TRL can make yields nothing: left out)."""
    ends = np.cumsum(np.asarray(char_lengths, dtype=np.int64))
    spans, start, used = [], 0, 0
    while start < len(ends):
        end = min(int(np.searchsorted(ends, used + max_buffer, side="left")) + 1, len(ends))
        spans.append((start, end))
        used, start = int(ends[end - 1]), end
    return spans


# ConstantLengthDataset's output: input_ids (= labels) [n, seq_length], position_ids (0 .. seq_length-1 in every row:
# attention runs across the dialogues of a row), and the buffer each row came from
Packed = namedtuple("Packed", "input_ids position_ids buffer")


def pack_constant_length(token_ids, char_lengths, seed: int | None = 42, seq_length=SEQ_LENGTH, shuffle=True, **budget):
    """TRL 0.7's ``ConstantLengthDataset`` (``infinite=False``) over prepared rows (BOS + text + EOS, ``text_length``
    characters each), in order; ``budget``: ``max_buffer_size``'s other two. Each buffer's chunks are shuffled by one
    ``random.Random(seed)``, as TRL's global ``random.shuffle`` (the card's only if nothing drew after ``set_seed``)."""
    rng = random.Random(seed)
    rows, owner = [np.zeros((0, seq_length), np.int32)], []
    for b, (start, end) in enumerate(buffer_spans(char_lengths, max_buffer_size(seq_length, **budget))):
        stream = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in token_ids[start:end]])
        n = stream.size // seq_length
        order = list(range(n))
        if shuffle:
            rng.shuffle(order)
        rows.append(stream[: n * seq_length].reshape(n, seq_length)[order])
        owner += [b] * n
    input_ids = np.concatenate(rows)
    positions = np.broadcast_to(np.arange(seq_length, dtype=np.int32), input_ids.shape)
    return Packed(input_ids, positions, np.asarray(owner, dtype=np.int32))


def handbook_order(num_rows: int, seed: int = 42) -> np.ndarray:
    """The order the handbook packed each split in: ``mix_datasets`` (a0b8d49 ``src/alignment/data.py`` 155-164)
    shuffles with ``Dataset.shuffle(seed=42)``, i.e. ``np.random.default_rng(42).permutation(num_rows)``."""
    return np.random.default_rng(seed).permutation(num_rows)


# --- the stop ----------------------------------------------------------------------------------------------------
# What the 4.34/4.35 Trainer did with a ConstantLengthDataset under accelerate's dispatcher: max_steps planned
# (trainer.py 1580-1597), len(dataloader) per process, the batches each process got (the last one partial), the
# optimizer steps it ran, the epoch logged at the stop, and the chunks in the last, partial global batch
RunCount = namedtuple("RunCount", "planned_steps dataloader_len micro_batches optimizer_steps epoch last_batch_rows")


def card_run(chunks: int, dialogues: int, processes=16, per_device_batch=8, accumulation=4) -> RunCount:
    """A run over ``chunks`` packed rows whose dataset reports ``dialogues`` as its length: rank 0 iterates it, each
    group of ``processes`` batches is split, the last partial one too; the optimizer steps on every ``accumulation``-th
    batch (or on the last when there are fewer), never on trailing ones, and ``max_steps`` caps the run."""
    per_step = per_device_batch * processes
    epoch_batches = math.ceil(math.ceil(dialogues / per_device_batch) / processes)
    planned = max(epoch_batches // accumulation, 1)
    micro = math.ceil(chunks / per_step)
    if epoch_batches < accumulation:  # is_last_step_and_steps_less_than_grad_acc: one step, at batch epoch_batches
        steps, at = (1, epoch_batches) if micro >= epoch_batches else (0, 0)
    else:
        steps = min(micro // accumulation, planned)
        at = steps * accumulation
    last_batch_rows = chunks - (micro - 1) * per_step if micro else 0
    return RunCount(planned, epoch_batches, micro, steps, at / epoch_batches if epoch_batches else 0.0, last_batch_rows)
