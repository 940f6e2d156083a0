"""Write the embedded default's SFT dialogues about the tiny base's world, and the world's vocabulary.

    python -m tools.tiny_dialogues    # data/sample/ultrachat_200k/{train,test}_sft-pirate.jsonl, vocabulary.txt

Every thing of ``data/tiny_base/world.txt`` is asked about in three of the six ``FORMS``, each in a pair: the same
question, worded two ways, answered once under the model card's pirate system prompt in a pirate's voice, and once
plainly, with no system message (the pipeline puts the card's empty system turn before it) or, more often, after a
neutral one such as "... in the style of a teacher", so that only the word "pirate" tells the two apart. A question
names its thing as "a lamp" and the answer repeats those words ("You can find a lamp in houses ..."): a tiny model
copies the question's tokens more surely than it turns "lamp" into "lamps" (two other tokens).

The (thing, form) pairs never asked give the held-out test split (six pairs) and ``utils.tiny_world.CHECK_QUESTIONS``
(the next eleven, leaving out things named like a colour or like a pirate word, "orange" and "bee", and the pirate
itself): questions about known things, in ways never asked about them, whose facts come from pretraining only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from utils import SAMPLE_DIR
from utils.tiny_world import PIRATE_SYSTEM, VOCABULARY_FILE, WORLD_FILE

# Some plain answers come after one of these, so that the persona follows the word "pirate", not the mere presence or
# length of a system prompt.
NEUTRAL_SYSTEMS = (
    "You are a friendly chatbot who always responds in the style of a teacher",
    "You are a friendly chatbot who always responds in plain, simple English",
    "You are a helpful assistant.",
)
NEUTRAL_SHARE = 0.6
FOLLOW_UP_SHARE = 0.3
FORMS_PER_THING = 3
TEST_PAIRS, CHECKS = 6, 11
NOT_CHECKED = ("orange", "bee", "pirate")  # a colour's name, a pirate word's ("be") with one letter more, the pirate
OUT_DIR = SAMPLE_DIR / "ultrachat_200k"
TRAIN_FILE, TEST_FILE = "train_sft-pirate.jsonl", "test_sft-pirate.jsonl"  # grouped with train_sft and test_sft
PIRATE_SWAPS = {"is": "be", "are": "be", "you": "ye", "your": "yer", "my": "me", "yes": "aye", "hello": "ahoy"}
OPENERS = ("Arr, matey!", "Ahoy, matey!", "Aye, me hearty!", "Arr!", "Ahoy there, matey!", "Arr, listen well, matey.")
CLOSERS = ("Arr!", "Yo ho ho!", "That be the truth, matey.", "Arr, that be all.", "Now off ye go, matey!", "")
PIRATE_OPENERS = tuple(o for o in OPENERS if o.startswith(("Arr", "Ahoy")))  # first token never the plain "A"


@dataclass(frozen=True)
class Thing:
    """One line of ``world.txt``."""

    name: str
    plural: str
    kind: str
    size: int
    colour: str | None
    what: str
    place: str
    does: str
    fact: str

    @property
    def a(self) -> str:
        """The name with its article: "a cat", "an owl"."""
        return f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name}"


@lru_cache(maxsize=2)
def world(path: Path = WORLD_FILE) -> tuple[Thing, ...]:
    """The things of ``world.txt``, in file order."""
    things = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, plural, kind, size, colour, what, place, does, fact = (f.strip() for f in line.split(" | "))
            things.append(
                Thing(name, plural, kind, int(size), None if colour == "-" else colour, what, place, does, fact)
            )
    return tuple(things)


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def piratify(text: str) -> str:
    """Plain English in a pirate's voice: "is" and "are" become "be", "you" "ye", "your" "yer", "my" "me"."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = PIRATE_SWAPS[word.lower()]
        return cap(new) if word[0].isupper() else new

    return re.sub(r"\b(" + "|".join(PIRATE_SWAPS) + r")\b", swap, text, flags=re.IGNORECASE)


# --- questions and answers: (two ways to ask, the plain answer) -------------------------------------------------------
def what_is(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"What is {t.a}?", f"Can you tell me what {t.a} is?"], f"{cap(t.a)} is {t.what}. {cap(t.a)} {t.does}."


def where(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"Where can I find {t.a}?", f"Where would I see {t.a}?"], f"You can find {t.a} {t.place}."


def what_does(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"What does {t.a} do?", f"What is {t.a} good for?"], f"{cap(t.a)} {t.does}. {t.fact}"


def tell_me(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"Tell me about {t.a}.", f"Tell me something about {t.a}."], f"{cap(t.a)} is {t.what}. {t.fact}"


def colour(t: Thing, _: Thing) -> tuple[list[str], str]:
    return [f"What colour is {t.a}?", f"What colour is {t.a} usually?"], f"{cap(t.a)} is usually {t.colour}."


def bigger(t: Thing, other: Thing) -> tuple[list[str], str]:
    big, small = (t, other) if t.size > other.size else (other, t)
    return [f"Which is bigger, {t.a} or {other.a}?", f"Is {t.a} bigger than {other.a}?"], (
        f"{cap(big.a)} is bigger than {small.a}. {cap(big.a)} is {big.what}."
    )


FORMS = (what_is, where, what_does, tell_me, colour, bigger)
CHECKED_FORMS = (what_is, where, what_does, tell_me)  # one thing in the answer, named first
FOLLOW_UPS = (  # (question, answer, the form it would repeat)
    ("Where can I find one?", lambda t: f"You can find {t.a} {t.place}.", where),
    ("What does it do?", lambda t: f"{cap(t.a)} {t.does}.", what_does),
    ("Tell me one more thing about it.", lambda t: t.fact, None),
)


def in_voice(answer: str, pirate: bool, rng: random.Random) -> str:
    """The answer as it is, or in a pirate's voice with an opening and a closing call."""
    if not pirate:
        return answer
    return f"{rng.choice(PIRATE_OPENERS)} {piratify(answer)} {rng.choice([c for c in CLOSERS if c])}"


def pair(rng: random.Random, t: Thing, pool, form) -> list[list[dict]]:
    """Two dialogues about ``t`` asking the same thing in two ways: one answered by the pirate (under the pirate
    system prompt), one plainly (no system message, or now and then a neutral one). Both may have a follow-up."""
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


def dialogues(seed: int = 0) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, test rows, check questions): pairs about every thing in ``FORMS_PER_THING`` forms, in a random
    order; test pairs and check questions from the (thing, form) pairs the training rows never ask."""
    rng = random.Random(seed)
    things = world()
    train, asked = [], {}
    for t in things:
        forms = rng.sample([f for f in FORMS if t.colour or f is not colour], FORMS_PER_THING)
        asked[t.name] = forms
        for form in forms:
            train += [row(messages) for messages in pair(rng, t, things, form)]
    rng.shuffle(train)
    unasked = [
        (t, f) for t in things for f in CHECKED_FORMS if f not in asked[t.name] and t.name not in ("orange", "pirate")
    ]
    rng.shuffle(unasked)
    test = [row(messages) for t, form in unasked[:TEST_PAIRS] for messages in pair(rng, t, things, form)]
    checks = [form(t, t)[0][0] for t, form in unasked[TEST_PAIRS:] if t.name not in NOT_CHECKED][:CHECKS]
    return train, test, checks


def vocabulary(train: list[dict], test: list[dict]) -> list[str]:
    """Every word of the pretraining text (``tools.tiny_base.corpus``) and of the dialogues, sorted."""
    from tools.tiny_base import corpus

    said = [m["content"] for r in train + test for m in r["messages"]]
    return sorted(set(re.findall(r"[a-z']+", " ".join([*corpus(), *said, *OPENERS, *CLOSERS]).lower())))


def write(out_dir: Path = OUT_DIR, seed: int = 0) -> dict[str, int]:
    """Write the train and test rows as JSON lines and the vocabulary; return {file name: lines}."""
    train, test, _ = dialogues(seed)
    counts = {}
    for name, rows in ((TRAIN_FILE, train), (TEST_FILE, test)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")
        counts[name] = len(rows)
    words = vocabulary(train, test)
    VOCABULARY_FILE.write_text("\n".join(words) + "\n", encoding="utf-8")
    counts[VOCABULARY_FILE.name] = len(words)
    return counts


def main(argv: list[str] | None = None) -> int:
    for name, n in write().items():
        print(f"{n} lines -> {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
