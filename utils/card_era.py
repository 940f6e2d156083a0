"""The card's era in code: its token ids, its packing, and the step at which its training stopped.

mistral-7b-sft-beta was trained in October 2023 with transformers 4.35.0.dev0 and tokenizers 0.14.0 (the card), TRL's
``SFTTrainer`` with ``packing=True`` (alignment-handbook a0b8d49 pins trl 0.7.4; ``ConstantLengthDataset`` is the same
code in 0.7.1 to 0.7.4) on 16 GPUs. Three things of that era differ from what today's libraries do by default:

* **Token ids.** The Hub's ``tokenizer.json`` of 2023 normalised every piece of text between special tokens with
  ``Prepend("▁")``, so ``</s>`` was followed by ``▁`` (id 28705), and its BPE merges were ordered by sentencepiece
  score. transformers 5.x drops that normaliser (``Metaspace``, ``prepend_scheme`` from the ``legacy`` flag), and
  its conversion of ``tokenizer.model`` orders merges by id, which splits runs of spaces differently.
  Text between special tokens means a message's too: ``</s>`` typed in a message became an EOS. ``tokenize_dialogues``
  gives the card's ids (``scheme="card"``) or today's (``"today"``) from any tokenizer of this vocabulary, whatever
  its flags; ``sentencepiece_reference`` is the library's own answer, for checks.
* **Packing.** ``pack_constant_length`` is ``ConstantLengthDataset.__iter__`` on prepared rows: buffers of
  ``seq_length * chars_per_token * num_of_sequences`` characters of formatted text, each tokenized, joined with EOS,
  cut into ``seq_length`` chunks (remainder dropped) and shuffled.
* **The stop.** ``card_run`` counts the optimizer steps the HF Trainer of 4.35 takes on such a stream with
  accelerate dispatching batches from rank 0: it plans ``len(dialogues)`` worth of steps and stops when the chunks end.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.assets import sentencepiece_file, sentencepiece_merges, sentencepiece_processor

SCHEMES = ("card", "today")
SEQ_LENGTH = 2048  # max_seq_length of recipes/zephyr-7b-beta/sft/config_full.yaml
NUM_OF_SEQUENCES = 1024  # SFTTrainer's default in TRL 0.7.x; the handbook does not set it
CHARS_PER_TOKEN = 3.6  # SFTTrainer's default in TRL 0.7.x: a constant, never estimated from the data
# The Hub tokenizer.json of 2023 (transformers 4.34/4.35 LlamaConverter): every piece between special tokens gets "▁".
CARD_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
# transformers 5.x with legacy=False: "▁" before the first piece of the text only.
TODAY_PRE_TOKENIZER = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}


# --- token ids ---------------------------------------------------------------------------------------------------
def _model_file() -> str:
    return str(sentencepiece_file())


_BACKENDS: dict[tuple, tuple] = {}  # key -> (tokenizer, backend): holding the tokenizer keeps its id unique


def era_backend(tokenizer, scheme: str = "card", text_specials: bool = False, first: bool = True):
    """A copy of ``tokenizer``'s Rust backend with the card's pipeline or today's, independent of its flags.

    ``card``: the 2023 normaliser, and, for the Mistral v1 vocabulary, merges in sentencepiece-score order.
    ``today``: no normaliser, ``Metaspace`` with ``prepend_scheme="first"`` (``"never"`` when not ``first``), the
    tokenizer's own merges. ``text_specials`` encodes special-token text as ordinary text.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    key = (id(tokenizer), scheme, text_specials, first)
    if key not in _BACKENDS:
        from tokenizers import Tokenizer

        state = json.loads(tokenizer.backend_tokenizer.to_str())
        for added in state["added_tokens"]:
            added["normalized"] = False  # split at special tokens before normalising, as the 2023 file did
        if scheme == "card":
            state["normalizer"], state["pre_tokenizer"] = CARD_NORMALIZER, None
            vocab, merges = sentencepiece_merges(_model_file())
            if state["model"].get("type") == "BPE" and state["model"]["vocab"] == vocab:
                state["model"]["merges"] = merges
        else:
            state["normalizer"] = None
            state["pre_tokenizer"] = {**TODAY_PRE_TOKENIZER, "prepend_scheme": "first" if first else "never"}
        backend = Tokenizer.from_str(json.dumps(state))
        backend.encode_special_tokens = text_specials
        _BACKENDS[key] = (tokenizer, backend)
    return _BACKENDS[key][1]


def render_text(messages: Sequence[dict], eos: str = "</s>") -> str:
    """The Zephyr template of the card (handbook a0b8d49's ``DEFAULT_CHAT_TEMPLATE``) for ``messages`` as given:
    ``<|role|>\\n`` + content + EOS + ``\\n`` per message; no BOS (the tokenizer adds it), no generation prompt."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)


def tokenize_dialogues(
    tokenizer,
    dialogues: Sequence[Sequence[dict]],
    scheme: str = "card",
    text_specials: bool | None = None,
    answers: bool = False,
):
    """BOS + the rendered dialogue + EOS for each dialogue (its messages, system turn included), in the card's ids
    or today's: the contract of ``utils.prepare_data.tokenize_dialogues``.

    Special-token text inside a message (``</s>``, ``<s>``, ``<unk>`` typed as text): ``card`` makes it control
    tokens, as the card's tokenizer did with the rendered text (``" </s> "`` → 28705, 2, 28705); ``today``, or
    ``text_specials=True``, keeps it ordinary text: only the template's markers become control tokens (a dialogue
    holding such text is encoded piece by piece between the template's EOS markers).

    With ``answers``, also each dialogue's answer mask: 1 on the tokens of each assistant message's content and the
    EOS that ends it, 0 elsewhere, from where the template put each message (the tokens' character offsets), so text
    inside a message that looks like a marker (``<|assistant|>``) changes nothing. Returns ``(ids, masks)`` then.
    """
    if text_specials is None:
        text_specials = scheme != "card"
    eos = tokenizer.eos_token
    specials = [t for t in tokenizer.all_special_tokens if t] if text_specials else []
    ids: list[list[int] | None] = [None] * len(dialogues)
    masks: list[list[int] | None] = [None] * len(dialogues)
    plain = [i for i, d in enumerate(dialogues) if not any(t in m["content"] for m in d for t in specials)]
    texts = [render_text(dialogues[i], eos) + eos for i in plain]
    backend = era_backend(tokenizer, scheme)
    encodings = backend.encode_batch(texts) if answers else backend.encode_batch_fast(texts)
    for i, encoding in zip(plain, encodings, strict=True):
        ids[i] = encoding.ids
        if answers:
            masks[i] = _in_spans(encoding.offsets, _answer_spans(dialogues[i], eos))
    for i, dialogue in enumerate(dialogues):
        if ids[i] is None:
            ids[i], masks[i] = _tokenize_safely(tokenizer, dialogue, scheme)
    return (ids, masks) if answers else ids  # type: ignore[return-value]


def _answer_spans(messages: Sequence[dict], eos: str) -> list[tuple[int, int]]:
    """Where ``render_text(messages) + eos`` puts each assistant message's content and the EOS after it."""
    spans, at = [], 0
    for m in messages:
        start = at + len(f"<|{m['role']}|>\n")
        end = start + len(m["content"]) + len(eos)
        if m["role"] == "assistant":
            spans.append((start, end))
        at = end + 1  # the "\n" after the EOS
    return spans


def _in_spans(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose text starts inside one of ``spans`` (a BOS added by the tokenizer has no text)."""
    return [int(end > start and any(a <= start < b for a, b in spans)) for start, end in offsets]


def _tokenize_safely(tokenizer, messages: Sequence[dict], scheme: str) -> tuple[list[int], list[int]]:
    """The pieces between the template's EOS markers, encoded one by one with special-token text kept as text, and
    the answer mask (each assistant message's content tokens and the EOS after it).

    Card: every piece gets the leading ``▁`` (the normaliser runs per piece). Today: only the first piece does.
    """
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


def sentencepiece_reference(text: str, model_file: str | None = None, bos: int = 1, eos: int = 2) -> list[int]:
    """What Mistral's sentencepiece model gives the legacy way: BOS, then each piece between the special tokens
    ``<unk>``, ``<s>``, ``</s>`` encoded on its own (with sentencepiece's dummy-prefix ``▁``), each special token
    as its id."""
    sp = sentencepiece_processor(model_file or _model_file())
    control = {"<unk>": 0, "<s>": bos, "</s>": eos}
    ids = [bos]
    for piece in re.split("(<unk>|<s>|</s>)", text):
        ids += [control[piece]] if piece in control else sp.encode(piece) if piece else []
    return ids


# --- packing -----------------------------------------------------------------------------------------------------
def text_length(messages: Sequence[dict], eos: str = "</s>") -> int:
    """Characters of the card's formatted text (``len(example["text"])``, what ConstantLengthDataset's buffer counts):
    the template only, without the BOS and the separator EOS that tokenization adds."""
    return sum(len(m["role"]) + len(m["content"]) + len(eos) + 6 for m in messages)


def max_buffer_size(
    seq_length: int = SEQ_LENGTH, num_of_sequences: int = NUM_OF_SEQUENCES, chars_per_token: float = CHARS_PER_TOKEN
) -> float:
    """The character budget of one buffer: ``seq_length * chars_per_token * num_of_sequences`` (7,549,747.2)."""
    return seq_length * chars_per_token * num_of_sequences


def buffer_spans(char_lengths: Sequence[int], max_buffer: float) -> list[tuple[int, int]]:
    """``[start, end)`` of each buffer: rows are added while the buffer holds fewer than ``max_buffer`` characters,
    so a buffer ends with the row that reaches it. The empty buffer TRL makes when the rows end exactly at a buffer
    boundary yields nothing and is left out."""
    ends = np.cumsum(np.asarray(char_lengths, dtype=np.int64))
    spans, start, used = [], 0, 0
    while start < len(ends):
        end = int(np.searchsorted(ends, used + max_buffer, side="left")) + 1
        end = min(end, len(ends))
        spans.append((start, end))
        used, start = int(ends[end - 1]), end
    return spans


@dataclass(frozen=True)
class Packed:
    """ConstantLengthDataset's output: ``input_ids`` (= labels) ``[n, seq_length]``, ``position_ids`` (0 ..
    seq_length-1 in every row: attention runs across the dialogues of a row), and the buffer each row came from."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    buffer: np.ndarray


def pack_constant_length(
    token_ids: Sequence[Sequence[int]],
    char_lengths: Sequence[int],
    seed: int | None = 42,
    seq_length: int = SEQ_LENGTH,
    num_of_sequences: int = NUM_OF_SEQUENCES,
    chars_per_token: float = CHARS_PER_TOKEN,
    shuffle: bool = True,
) -> Packed:
    """TRL 0.7's ``ConstantLengthDataset`` (``infinite=False``) over prepared rows, in dataset order.

    ``token_ids[i]`` is row i as TRL concatenated it: ``tokenizer(text)`` (BOS + text) plus the separator EOS, i.e. a
    prepared row (which ends with EOS); ``char_lengths[i]`` is ``text_length`` of its messages. Each buffer's chunks
    are shuffled with one ``random.Random(seed)`` in turn, as TRL's ``random.shuffle`` did with the global generator
    (seed 42 reproduces the card only if nothing drew from it between ``set_seed(42)`` and the first buffer).
    """
    rng = random.Random(seed)
    rows, owner = [], []
    budget = max_buffer_size(seq_length, num_of_sequences, chars_per_token)
    for b, (start, end) in enumerate(buffer_spans(char_lengths, budget)):
        stream = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in token_ids[start:end]])
        n = stream.size // seq_length
        chunks = stream[: n * seq_length].reshape(n, seq_length)
        order = list(range(n))
        if shuffle:
            rng.shuffle(order)
        rows.append(chunks[order])
        owner += [b] * n
    input_ids = np.concatenate(rows) if rows else np.zeros((0, seq_length), np.int32)
    positions = np.broadcast_to(np.arange(seq_length, dtype=np.int32), input_ids.shape)
    return Packed(input_ids, positions, np.asarray(owner, dtype=np.int32))


def count_constant_length(
    num_tokens: Sequence[int],
    char_lengths: Sequence[int],
    seq_length: int = SEQ_LENGTH,
    num_of_sequences: int = NUM_OF_SEQUENCES,
    chars_per_token: float = CHARS_PER_TOKEN,
) -> tuple[int, int, int]:
    """``(chunks, buffers, tokens dropped)`` of ``pack_constant_length`` from row lengths alone (tokens per row
    including BOS and the separator EOS)."""
    tokens = np.asarray(num_tokens, dtype=np.int64)
    spans = buffer_spans(char_lengths, max_buffer_size(seq_length, num_of_sequences, chars_per_token))
    per_buffer = [int(tokens[start:end].sum()) for start, end in spans]
    chunks = sum(t // seq_length for t in per_buffer)
    return chunks, len(spans), sum(t % seq_length for t in per_buffer)


def handbook_order(num_rows: int, seed: int = 42) -> np.ndarray:
    """The row order the handbook packed each split in: ``mix_datasets`` (a0b8d49 ``src/alignment/data.py``
    155-164) shuffles the train split and the test split with ``Dataset.shuffle(seed=42)``, i.e.
    ``np.random.default_rng(42).permutation(num_rows)``."""
    return np.random.default_rng(seed).permutation(num_rows)


# --- the stop ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunCount:
    """What the Trainer of transformers 4.34/4.35 does with a ConstantLengthDataset under accelerate's dispatcher."""

    planned_steps: int  # max_steps: max(len(dataloader) // accumulation, 1) (4.35 trainer.py 1580-1597), one epoch
    dataloader_len: int  # len(dataloader) per process: ceil(ceil(dialogues / batch) / processes)
    micro_batches: int  # batches each process gets: ceil(chunks / (batch * processes)), the last one partial
    optimizer_steps: int  # where training stopped
    epoch: float  # logged epoch at the stop: accumulation * steps / len(dataloader)
    last_batch_rows: int  # chunks in the last, partial global batch (split across processes by the dispatcher)


def card_run(
    chunks: int, dialogues: int, processes: int = 16, per_device_batch: int = 8, accumulation: int = 4
) -> RunCount:
    """Optimizer steps of a run over ``chunks`` packed rows whose dataset reports ``dialogues`` as its length.

    Only rank 0 iterates the IterableDataset; every ``processes`` batches of ``per_device_batch`` are broadcast and
    split, the last partial group too (``drop_last=False``), so each process sees ``ceil(chunks / global micro
    batch)`` batches. The optimizer steps on every ``accumulation``-th batch (or on batch ``len(dataloader)`` when
    that is at most ``accumulation``); trailing batches are computed but never stepped; ``max_steps`` caps the run.
    """
    per_step = per_device_batch * processes
    epoch_batches = math.ceil(math.ceil(dialogues / per_device_batch) / processes)
    planned = max(epoch_batches // accumulation, 1)
    micro = math.ceil(chunks / per_step)
    if epoch_batches < accumulation:  # is_last_step_and_steps_less_than_grad_acc: one step, at batch epoch_batches
        steps, at = (1, epoch_batches) if micro >= epoch_batches else (0, 0)
    else:
        steps = min(micro // accumulation, planned)
        at = steps * accumulation
    return RunCount(
        planned_steps=planned,
        dataloader_len=epoch_batches,
        micro_batches=micro,
        optimizer_steps=steps,
        epoch=at / epoch_batches if epoch_batches else 0.0,
        last_batch_rows=chunks - (micro - 1) * per_step if micro else 0,
    )


def chunk_range_for_steps(
    steps: int, processes: int = 16, per_device_batch: int = 8, accumulation: int = 4
) -> tuple[int, int]:
    """The chunk counts (inclusive range) for which a run stops at ``steps`` optimizer steps (when that is below
    the planned number): 272 on 16 x 8 x 4 needs 139,137 to 139,648 chunks."""
    per_step = per_device_batch * processes
    return (steps * accumulation - 1) * per_step + 1, (steps * accumulation + accumulation - 1) * per_step


def read_rows(path: str | Path) -> list[list[dict]]:
    """The ``messages`` of each JSON line of ``path`` whose messages are a list of role/content string dicts (for
    checks on the shipped sample without the preparation pipeline)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            messages = json.loads(line).get("messages")
        except (ValueError, AttributeError):
            continue
        if (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages
            )
        ):
            rows.append(messages)
    return rows
