"""From a row to token ids: the row's messages, the Zephyr template with the card's empty system turn, the tokenizer."""

from __future__ import annotations

import hashlib
from typing import Any

from utils import card_era

# card: the ids the card trained on (the 2023 tokenizer put "▁" after every </s>), special-token text in a message
# (</s>) made control tokens; card-text: the same ids with such text kept text; today: transformers 5.x's
TOKENIZATIONS = ("card", "card-text", "today")


def to_messages(obj: dict) -> tuple[Any, str | None]:
    """The ``messages`` of a row in either schema (ultrachat_200k, or raw ``id`` + ``data``), or a drop reason."""
    if "messages" in obj:
        return obj["messages"], None
    if "data" not in obj:
        return None, "missing_messages"
    if not isinstance(obj["data"], list):
        return None, "structure:not_a_list"
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(obj["data"])], None


def prompt_id(prompt: str) -> str:
    """The ultrachat_200k ``prompt_id``: the SHA-256 hex digest of the prompt."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def with_system_turn(messages: list[dict]) -> list[dict]:
    """``messages`` with an empty system turn first when they have none, as the card's alignment-handbook did: its
    ``apply_chat_template`` (src/alignment/data.py at a0b8d49) began every SFT text ``<s><|system|>\\n</s>\\n``."""
    return messages if messages and messages[0]["role"] == "system" else [{"role": "system", "content": ""}, *messages]


def render(messages: list[dict], eos: str = "</s>", system_turn: bool = True) -> str:
    """``tokenizer.apply_chat_template(with_system_turn(messages), tokenize=False) + eos`` (a test checks it), without
    Jinja; the trailing EOS is what TRL 1.x (``add_eos``) and the card's TRL (packing's separator) put after each."""
    return card_era.render_text(with_system_turn(messages) if system_turn else messages, eos) + eos


def tokenize_dialogues(tokenizer, dialogues: list, system_turn: bool = True, tokenization: str = "card", answers=False):
    """``<s>`` + ``render(dialogue)`` for each dialogue, in the ids of ``tokenization`` whatever the tokenizer's flags
    (``TOKENIZATIONS``; ``today``: transformers 5.x's, no ``▁`` after ``</s>``); with ``answers``, ``(ids, masks)``."""
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)}, got {tokenization!r}")
    dialogues = [with_system_turn(d) if system_turn else d for d in dialogues]
    return card_era.tokenize_dialogues(
        tokenizer, dialogues, "today" if tokenization == "today" else "card", tokenization != "card", answers
    )
