"""From a row to token ids: the row's messages, the Zephyr template with the card's empty system turn, the tokenizer.

Text inside a message that looks like a special token (``</s>``) becomes that control token in the card's ids, as
the card's tokenizer made it; ``card-text`` and ``today`` keep it text (only the template's markers are control
tokens there).
"""

from __future__ import annotations

import hashlib
from typing import Any

EMPTY_SYSTEM = {"role": "system", "content": ""}


def to_messages(obj: dict) -> tuple[Any, str | None]:
    """The ``messages`` of a row in either schema (ultrachat_200k, or raw ``id`` + ``data``), or a drop reason."""
    if "messages" in obj:
        return obj["messages"], None
    if "data" in obj:
        data = obj["data"]
        if not isinstance(data, list):
            return None, "structure:not_a_list"
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(data)], None
    return None, "missing_messages"


def prompt_id(prompt: str) -> str:
    """The ultrachat_200k ``prompt_id``: the SHA-256 hex digest of the prompt."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def with_system_turn(messages: list[dict]) -> list[dict]:
    """``messages`` with an empty system turn first when they have none, as the card's alignment-handbook did.

    Its ``apply_chat_template`` (src/alignment/data.py at a0b8d49) inserted ``{"role": "system", "content": ""}``
    into every SFT dialogue without one, so every training text began ``<s><|system|>\\n</s>\\n<|user|>``.
    """
    return messages if messages and messages[0]["role"] == "system" else [EMPTY_SYSTEM, *messages]


def _turns(messages: list[dict], system_turn: bool) -> list[dict]:
    return with_system_turn(messages) if system_turn else messages


def render(messages: list[dict], eos: str = "</s>", system_turn: bool = True) -> str:
    """The Zephyr template (``configs/chat_template.jinja``) in plain Python, plus the EOS TRL appends to text.

    With ``system_turn`` (the card's data), an empty system turn comes first where the dialogue has none. Identical
    to ``tokenizer.apply_chat_template(with_system_turn(messages), tokenize=False) + eos`` (a test checks it), and
    much faster than Jinja. The trailing EOS is what both TRL 1.x (``add_eos`` on text datasets) and the card's TRL
    (EOS as the separator between packed samples) put after each dialogue.
    """
    return "".join([f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in _turns(messages, system_turn)]) + eos


# card and today: utils.card_era.SCHEMES; card-text: the card's ids with special-token text in messages kept as text
TOKENIZATIONS = ("card", "card-text", "today")


def tokenize_dialogues(
    tokenizer, dialogues: list[list[dict]], system_turn: bool = True, tokenization: str = "card", answers: bool = False
):
    """``<s>`` + the rendered dialogue (``render``) for each dialogue, in the card's token ids or today's.

    ``tokenization="card"`` (the default) gives the ids the card trained on: the 2023 tokenizer put ``▁`` (28705)
    after every ``</s>``, so ``</s>\n<|assistant|>`` is ``2, 28705, 13, 28789, ...``. ``"today"`` gives what
    transformers 5.x gives with ``legacy=False``: ``2, 13, 28789, ...``. Either comes from a copy of the tokenizer's
    backend with that era's pipeline (``utils.card_era.era_backend``), whatever the tokenizer's own flags.

    Text inside a message that looks like a special token (``</s>``, ``<s>``, ``<unk>``): ``"card"`` makes it that
    control token, as the card's tokenizer did (``" </s> "`` → ``28705, 2, 28705``); ``"card-text"`` (the card's ids
    otherwise) and ``"today"`` keep it text (``▁</``, ``s``, ``>``): only the template's markers become control tokens.

    With ``answers``, ``(ids, masks)``: each mask 1 on the assistant's answers and the EOS ending each, placed from
    the message boundaries (``utils.card_era.tokenize_dialogues``).
    """
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)}, got {tokenization!r}")
    from utils.card_era import tokenize_dialogues as era_ids

    scheme = "today" if tokenization == "today" else "card"
    return era_ids(tokenizer, [_turns(d, system_turn) for d in dialogues], scheme, tokenization != "card", answers)
