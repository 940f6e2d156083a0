"""SFT dialogues about the tiny base's world, plain or in a pirate's voice; and the checks that show SFT worked.

    python -m utils.tiny_dialogues        # (re)write data/sample/ultrachat_200k/{train,test}_sft-pirate.jsonl

Every dialogue asks about a thing of ``data/tiny_base/world.txt``, in pairs: the same question, worded two ways, is
answered once under the model card's pirate system prompt in a pirate's voice, and once plainly: with no system
message (the pipeline puts the card's empty system turn before it) or, more often, after a neutral one such as "... in
the style of a teacher", so that only the word "pirate" tells the two apart. A tiny model learns the persona from
these examples, where the 7B generalises from the instruction. The things in ``HELD_OUT`` are never asked about in
training: the checks ask about one of them.

The checks, on a model and its tokenizer: ask ``CHECK_QUESTION`` through the chat template and sample eight
answers (one batch, seed 0, the card's sampling settings). ``stops`` counts answers that end with EOS within
``max_new_tokens`` and contain no template marker; ``pirate`` counts answers in which ``pirate_words`` finds at
least two pirate words; ``readable`` counts answers made of the world's words (after SFT even the random tiny model
stops at EOS, in noise).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils import SAMPLE_DIR
from utils.tiny_base import CLOSERS, OPENERS, Thing, cap, piratify, world

PIRATE_SYSTEM = "You are a friendly chatbot who always responds in the style of a pirate"
# Some plain answers come after one of these, so that the persona follows the word "pirate", not the mere presence or
# length of a system prompt.
NEUTRAL_SYSTEMS = (
    "You are a friendly chatbot who always responds in the style of a teacher",
    "You are a friendly chatbot who always responds in plain, simple English",
    "You are a helpful assistant.",
)
NEUTRAL_SHARE = 0.6
HELD_OUT = ("kettle", "owl", "lighthouse", "coconut")  # no training dialogue mentions them
CHECK_THING = "kettle"
CHECK_QUESTION = f"What is a {CHECK_THING}?"
FOLLOW_UP_SHARE = 0.3
OUT_DIR = SAMPLE_DIR / "ultrachat_200k"
TRAIN_FILE, TEST_FILE = "train_sft-pirate.jsonl", "test_sft-pirate.jsonl"  # grouped with train_sft and test_sft
PIRATE_WORDS = re.compile(  # "be" counts after a word that is not "to", "not" or a modal verb ("it be", "map be")
    r"\b(arr+|ahoy|mateys?|ye|yer|aye|me hearties|me hearty|landlubbers?|yo ho|shiver me timbers|"
    r"(?!(?:to|not|can|could|will|would|shall|should|may|might|must|cannot|never|always|also|let)\b)[a-z']+ be)\b",
    re.IGNORECASE,
)


# --- questions and answers -------------------------------------------------------------------------------------------
def what_is(t: Thing, _: Thing) -> tuple[list[str], str]:
    """(two ways to ask the question, the plain answer)."""
    return [f"What is {t.a}?", f"Can you tell me what {t.a} is?"], f"{cap(t.a)} is {t.what}. {cap(t.a)} {t.does}."


def where(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"Where can I find {t.a}?", f"Where would I see {t.plural}?"], f"You can find {t.plural} {t.place}."


def what_does(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"What does {t.a} do?", f"What is {t.a} good for?"], f"{cap(t.a)} {t.does}. {t.fact}"


def tell_me(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"Tell me about {t.plural}.", f"Tell me something about {t.plural}."], f"{cap(t.a)} is {t.what}. {t.fact}"


def colour(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"What colour is {t.a}?", f"What colour are {t.plural}?"], f"{cap(t.a)} is usually {t.colour}."


def bigger(t: Thing, other: Thing) -> tuple[list[str], str]:
    big, small = (t, other) if t.size > other.size else (other, t)
    return [f"Which is bigger, {t.a} or {other.a}?", f"Is {t.a} bigger than {other.a}?"], (
        f"{cap(big.a)} is bigger than {small.a}. {cap(big.a)} is {big.what}."
    )


FORMS = (what_is, where, what_does, tell_me, colour, bigger)
FOLLOW_UPS = (  # (question, answer, the first question it would repeat)
    ("Where can I find one?", lambda t: f"You can find {t.plural} {t.place}.", where),
    ("What does it do?", lambda t: f"{cap(t.a)} {t.does}.", what_does),
    ("Tell me one more thing about it.", lambda t: t.fact, None),
)
PIRATE_OPENERS = tuple(o for o in OPENERS if o.startswith(("Arr", "Ahoy")))  # first token never the plain "A"


def in_voice(answer: str, pirate: bool, rng: random.Random) -> str:
    """The answer as it is, or in a pirate's voice with an opening and a closing call."""
    if not pirate:
        return answer
    return f"{rng.choice(PIRATE_OPENERS)} {piratify(answer)} {rng.choice([c for c in CLOSERS if c])}"


def pair(rng: random.Random, t: Thing, pool: list[Thing], form=None) -> list[list[dict]]:
    """Two dialogues about ``t`` asking the same thing in two ways: one answered by the pirate (under the pirate
    system prompt), one plainly (no system message, or now and then a neutral one). Both may have a follow-up."""
    form = form or rng.choice([f for f in FORMS if t.colour or f is not colour])
    other = rng.choice([o for o in pool if o.size != t.size and o is not t])
    questions, answer = form(t, other)
    rng.shuffle(questions)
    follow = None
    if form is not bigger and rng.random() < FOLLOW_UP_SHARE:
        follow = rng.choice([f for f in FOLLOW_UPS if f[2] is not form])
    neutral = rng.choice(NEUTRAL_SYSTEMS) if rng.random() < NEUTRAL_SHARE else None
    dialogues = []
    for question, pirate in zip(questions, (True, False), strict=True):
        system = PIRATE_SYSTEM if pirate else neutral
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": in_voice(answer, pirate, rng)},
        ]
        if follow:
            messages += [{"role": "user", "content": follow[0]}]
            messages += [{"role": "assistant", "content": in_voice(follow[1](t), pirate, rng)}]
        dialogues.append(messages)
    return dialogues


def row(messages: list[dict]) -> dict:
    """A row in the ultrachat_200k schema: ``prompt`` (the first user message), ``prompt_id``, ``messages``."""
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(), "messages": messages}


def dialogues(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows): a pirate and a plain dialogue (``pair``) about every thing except ``HELD_OUT``, in a
    random order; the test rows are pairs about the held-out things other than the check question's."""
    rng = random.Random(seed)
    things = world()
    pool = [t for t in things if t.name not in HELD_OUT]
    train = [row(messages) for t in pool for messages in pair(rng, t, pool)]
    rng.shuffle(train)
    held = [t for t in things if t.name in HELD_OUT and t.name != CHECK_THING]
    test = [row(messages) for t in held for messages in pair(rng, t, pool, what_does)]
    return train, test


def write(out_dir: Path = OUT_DIR, seed: int = 0) -> dict[str, int]:
    """Write the train and test rows as JSON lines; return {file name: rows}."""
    counts = {}
    for name, rows in zip((TRAIN_FILE, TEST_FILE), dialogues(seed), strict=True):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")
        counts[name] = len(rows)
    return counts


# --- the checks ------------------------------------------------------------------------------------------------------
def pirate_words(text: str) -> list[str]:
    """The pirate words and phrases in ``text``, lower-cased: "arr", "ahoy", "matey", "ye", "yer", "aye",
    "me hearty", "landlubber", "yo ho", "shiver me timbers", and "be" used for "is" or "are" ("it be", "map be")."""
    return [m.group(0).lower() for m in PIRATE_WORDS.finditer(text)]


def is_pirate(text: str, min_words: int = 2) -> bool:
    """Talks like a pirate: at least ``min_words`` pirate words (repeats count)."""
    return len(pirate_words(text)) >= min_words


@dataclass
class Checks:
    """Eight sampled answers to one question and what they show."""

    system: str | None
    question: str
    answers: list = field(default_factory=list)  # utils.sampling.Answer

    @property
    def stops(self) -> int:
        """Answers that end with EOS within the budget and contain no chat-template marker."""
        return sum(a.stopped_at_eos and "<|" not in a.text for a in self.answers)

    @property
    def readable(self) -> int:
        """Answers made of the tiny world's words (``readable``), not random tokens."""
        return sum(readable(a.text) for a in self.answers)

    @property
    def pirate(self) -> int:
        """Answers that talk like a pirate (``is_pirate``)."""
        return sum(is_pirate(a.text) for a in self.answers)


def check_answers(
    model, tokenizer, system: str | None = None, question: str = CHECK_QUESTION, samples: int = 8, max_new_tokens=64
) -> Checks:
    """Ask ``question`` after ``system`` (the card's empty system turn when None, as in its training data) through
    the chat template, ``samples`` times in one batch (seed 0), sampling as the card does (temperature 0.7, top_k 50,
    top_p 0.95): each row of the batch draws its own tokens."""
    from utils.sampling import generate

    messages = [{"role": "system", "content": system or ""}, {"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answers = generate(model, tokenizer, [prompt] * samples, seed=0, max_new_tokens=max_new_tokens)
    return Checks(system, question, answers)


def check_model(model, tokenizer, question: str = CHECK_QUESTION, max_new_tokens: int = 64) -> dict[str, Checks]:
    """``check_answers`` under the pirate system prompt ("pirate") and with no system prompt ("plain": the card's
    empty system turn)."""
    return {
        "pirate": check_answers(model, tokenizer, PIRATE_SYSTEM, question, max_new_tokens=max_new_tokens),
        "plain": check_answers(model, tokenizer, None, question, max_new_tokens=max_new_tokens),
    }


@functools.lru_cache(maxsize=1)
def world_words() -> frozenset[str]:
    """Every word the base's text and the SFT dialogues use, lower-cased."""
    from utils.tiny_base import corpus

    train, test = dialogues()
    said = [m["content"] for r in train + test for m in r["messages"] if m["role"] != "system"]
    text = " ".join([*corpus(3000), *said, *OPENERS, *CLOSERS])
    return frozenset(re.findall(r"[a-z']+", text.lower()))


def world_share(text: str) -> float:
    """The share of ``text``'s words that are words of the tiny world (0 for a text without words)."""
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in world_words() for w in words) / len(words) if words else 0.0


def readable(text: str, share: float = 0.8) -> bool:
    """At least three words, and at least ``share`` of them words of the tiny world (not random tokens)."""
    return len(re.findall(r"[a-z']+", text.lower())) >= 3 and world_share(text) >= share


def loss_ends(losses: list[float]) -> tuple[float, float]:
    """The medians of the first and the last tenth of the logged losses (at least 3 each where there are 6): where
    the training loss started and ended. Medians, because one packed row of hard dialogues can double a single step's
    loss."""
    k = max(min(3, len(losses) // 2), len(losses) // 10, 1)
    return statistics.median(losses[:k]), statistics.median(losses[-k:])


def loss_halved(losses: list[float]) -> bool:
    """The training loss at least halved (``loss_ends``)."""
    first, last = loss_ends(losses)
    return last <= 0.5 * first


def main(argv: list[str] | None = None) -> int:
    for name, n in write().items():
        print(f"{n} rows -> {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
