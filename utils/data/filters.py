"""The row filters and the truecasing fix of notebook 01, one small function each.

Every filter answers with a drop *reason* (a short string) or ``None`` for "keep". The reasons are the keys of
``report.json``'s ``dropped`` table, so their names are part of the output format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils import CONFIGS_DIR

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
DISCLAIMERS_FILE = CONFIGS_DIR / "disclaimers.txt"
ABBREVIATIONS_FILE = CONFIGS_DIR / "abbreviations.txt"


def structure_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a well-formed dialogue, or ``None`` when it is.

    Well-formed: a list of ``{"role", "content"}`` dicts (any other key null); an optional system message first; then
    user and assistant strictly alternating, starting with user and ending with assistant; every content a non-empty
    string.
    """
    if not isinstance(messages, list):
        return "structure:not_a_list"
    if not messages:
        return "structure:empty_dialogue"
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return "structure:bad_message"
        # A key beyond role and content ("name", "tool_calls", ...) is dropped with its row rather than kept or
        # stripped: the Zephyr template renders only role and content, so the model would train on a dialogue
        # without what that key says, and the output's schema (ultrachat_200k's) has no place for it. A key whose
        # value is null says nothing (Parquet and Arrow sources give every message every field of the struct).
        if len(message) > 2 and any(v is not None for k, v in message.items() if k not in MESSAGE_KEYS):
            return "structure:unexpected_key"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return "structure:bad_role"
        if not isinstance(content, str):
            return "structure:content_not_string"
        if not content.strip():
            return "structure:empty_content"
        if role == "system":
            if i != 0:
                return "structure:misplaced_system"
            continue
        if role != expected:
            if i == 0 or (i == 1 and messages[0]["role"] == "system"):
                return "structure:starts_with_assistant"
            return "structure:not_alternating"
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] == "system":  # a system message and nothing else
        return "structure:empty_dialogue"
    if expected == "assistant":  # the last message was a user turn
        return "structure:ends_with_user"
    return None


def content_problem(messages: list[dict], max_chars: int) -> str | None:
    """``too_large`` over ``max_chars`` characters; ``invalid_unicode`` for text UTF-8 cannot encode (a lone
    surrogate such as a JSON-escaped ``\\ud800``); else None."""
    if sum(len(m["content"]) for m in messages) > max_chars:
        return "too_large"
    try:
        for m in messages:
            m["content"].encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_unicode"
    return None


def load_disclaimers(path: str | Path = DISCLAIMERS_FILE) -> list[str]:
    """Read one disclaimer phrase per line (``#`` starts a comment), normalised for matching.

    Raises ValueError, in one line, for a file that is not UTF-8 text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    if "\0" in text:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes)")
    lines = text.splitlines()
    return [normalise_apostrophes(line.strip()).lower() for line in lines if line.strip() and not line.startswith("#")]


def normalise_apostrophes(text: str) -> str:
    """Map typographic apostrophes to ASCII ones so "I don’t" matches "I don't"."""
    return text.replace("\u2019", "'").replace("\u2018", "'")


def disclaimer_in(messages: list[dict], phrases: Iterable[str]) -> str | None:
    """The first disclaimer phrase found in an assistant turn (case-insensitive), or ``None``."""
    for message in messages:
        if message["role"] != "assistant":
            continue
        text = message["content"].lower()
        if "\u2019" in text or "\u2018" in text:
            text = normalise_apostrophes(text)
        for phrase in phrases:
            if phrase in text:
                return phrase
    return None


# --- truecasing ----------------------------------------------------------------------------------------------------
# Protected spans are matched first and returned unchanged: fenced code, inline code, URLs (without the
# punctuation that ends their sentence).
# Otherwise: a token ending in . ! or ?, white space, then an all-lowercase word -> capitalise the word. (The token
# is the rest of the run of non-space characters, taken whole, then checked to end in . ! or ?: the same matches as
# \S*[.!?] without its backtracking.)
_TRUECASE = re.compile(
    r"(?P<keep>```.*?(?:```|\Z)|`[^`\n]*`|(?:https?://|www\.)\S*[^\s.,!?;:'\")\]])"
    r"|(?P<end>\S++(?<=[.!?]))(?P<space>\s+)(?P<word>[a-z][a-z']*\b)",
    re.DOTALL,
)
# A quick pre-check that lets the texts with nothing to fix skip the full scan: ``[.!?]\s+[a-z]`` as three patterns,
# each starting with a literal character, which the regex engine finds with a fast search instead of trying every
# position.
_MAYBE = tuple(re.compile(rf"{re.escape(end)}\s+[a-z]") for end in ".!?")


def load_abbreviations(path: str | Path = ABBREVIATIONS_FILE) -> frozenset[str]:
    """Read one abbreviation per line (``#`` starts a comment), lowercased: ``configs/abbreviations.txt``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


# Tokens after which a lowercase word is correct ("U.S. and", "e.g. the"), so they never count as a sentence end.
ABBREVIATIONS = load_abbreviations()


def _capitalise(match: re.Match) -> str:
    if match.group("keep") is not None:
        return match.group(0)
    end = match.group("end")
    if end.endswith("..") or end.lower().lstrip("([{\"'") in ABBREVIATIONS:
        return match.group(0)
    word = match.group("word")
    return f"{end}{match.group('space')}{word[0].upper()}{word[1:]}"


def truecase(text: str) -> str:
    """Capitalise a lowercase sentence start after ``.``, ``!`` or ``?``; leave code, URLs and abbreviations alone.

    >>> truecase("Hello. how are you?")
    'Hello. How are you?'
    """
    if not any(pattern.search(text) for pattern in _MAYBE):
        return text
    return _TRUECASE.sub(_capitalise, text)


def truecase_messages(messages: list[dict]) -> tuple[list[dict], int]:
    """Truecase every message; return the (possibly new) list and how many messages changed."""
    changed = 0
    out = messages
    for i, message in enumerate(messages):
        fixed = truecase(message["content"])
        if fixed != message["content"]:
            if out is messages:
                out = list(messages)
            out[i] = {**message, "content": fixed}
            changed += 1
    return out, changed
