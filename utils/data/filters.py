"""The row filters and the truecasing fix of notebook 01. A filter answers with a drop reason or ``None`` (keep):
the reasons are the keys of ``report.json``'s ``dropped`` table, part of the output format."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils import CONFIGS_DIR


def structure_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a well-formed dialogue, or ``None``: a list of ``{"role", "content"}`` dicts (any other
    key null), an optional system message, then user and assistant alternating, every content a non-empty string."""
    if not isinstance(messages, list):
        return "structure:not_a_list"
    if not messages:
        return "structure:empty_dialogue"
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return "structure:bad_message"
        # Another key ("name", "tool_calls") drops the row: the template renders only role and content, so the model
        # would train without what it says. A null one says nothing (Parquet gives every message every field).
        if len(message) > 2 and any(v is not None for k, v in message.items() if k not in ("role", "content")):
            return "structure:unexpected_key"
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            return "structure:bad_role"
        if not isinstance(content, str):
            return "structure:content_not_string"
        if not content.strip():
            return "structure:empty_content"
        if role == "system" and i != 0:
            return "structure:misplaced_system"
        if role not in ("system", expected):
            first = i == 0 or (i == 1 and messages[0]["role"] == "system")
            return "structure:starts_with_assistant" if first else "structure:not_alternating"
        if role != "system":
            expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] == "system":  # a system message and nothing else
        return "structure:empty_dialogue"
    return "structure:ends_with_user" if expected == "assistant" else None


def content_problem(messages: list[dict], max_chars: int) -> str | None:
    """``too_large`` over ``max_chars`` characters; ``invalid_unicode`` for a lone surrogate (such as ``\\ud800``)."""
    if sum(len(m["content"]) for m in messages) > max_chars:
        return "too_large"
    try:
        "".join(m["content"] for m in messages).encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_unicode"
    return None


def _phrases(path: str | Path) -> list[str]:
    """A phrase file's lines, stripped and lowercased, less blanks and ``#`` comments; ValueError if it is not text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    if "\0" in text:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes)")
    return [line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def load_disclaimers(path: str | Path = CONFIGS_DIR / "disclaimers.txt") -> list[str]:
    return [normalise_apostrophes(phrase) for phrase in _phrases(path)]


def normalise_apostrophes(text: str) -> str:
    """Typographic apostrophes made ASCII, so that "I don’t" matches "I don't"."""
    return text.replace("\u2019", "'").replace("\u2018", "'")


def disclaimer_in(messages: list[dict], phrases: Iterable[str]) -> str | None:
    """The first disclaimer phrase found in an assistant turn (case-insensitive), or ``None``."""
    texts = (normalise_apostrophes(m["content"].lower()) for m in messages if m["role"] == "assistant")
    return next((phrase for text in texts for phrase in phrases if phrase in text), None)


# --- truecasing ----------------------------------------------------------------------------------------------------
# Fenced code, inline code and URLs (without the punctuation ending their sentence) are matched first and kept.
# Otherwise a token ending in . ! or ?, white space, then an all-lowercase word: the word is capitalised. (The token
# is taken whole, then checked to end in . ! or ?: the matches of \S*[.!?] without its backtracking.)
_TRUECASE = re.compile(
    r"(?P<keep>```.*?(?:```|\Z)|`[^`\n]*`|(?:https?://|www\.)\S*[^\s.,!?;:'\")\]])"
    r"|(?P<end>\S++(?<=[.!?]))(?P<space>\s+)(?P<word>[a-z][a-z']*\b)",
    re.DOTALL,
)
# A pre-check that lets texts with nothing to fix skip the scan: ``[.!?]\s+[a-z]`` as three patterns, each starting
# with a literal character, which the regex engine finds by a fast search instead of trying every position.
_MAYBE = tuple(re.compile(rf"{re.escape(end)}\s+[a-z]") for end in ".!?")


def load_abbreviations(path: str | Path = CONFIGS_DIR / "abbreviations.txt") -> frozenset[str]:
    return frozenset(_phrases(path))


# Tokens after which a lowercase word is correct ("U.S. and", "e.g. the"), so they never count as a sentence end.
ABBREVIATIONS = load_abbreviations()


def _capitalise(match: re.Match) -> str:
    end = match.group("end")
    if match.group("keep") is not None or end.endswith("..") or end.lower().lstrip("([{\"'") in ABBREVIATIONS:
        return match.group(0)
    word = match.group("word")
    return f"{end}{match.group('space')}{word[0].upper()}{word[1:]}"


def truecase(text: str) -> str:
    """Capitalise a lowercase sentence start after ``.``, ``!`` or ``?`` ("Hello. how" -> "Hello. How"); leave code,
    URLs and abbreviations alone."""
    return _TRUECASE.sub(_capitalise, text) if any(pattern.search(text) for pattern in _MAYBE) else text


def truecase_messages(messages: list[dict]) -> tuple[list[dict], int]:
    """Every message truecased (a new dict for each one changed, the input left alone) and how many changed."""
    fixed = [{**m, "content": text} if (text := truecase(m["content"])) != m["content"] else m for m in messages]
    return fixed, sum(new is not old for new, old in zip(fixed, messages, strict=True))
