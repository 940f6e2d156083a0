"""The embedded default's small world, and the checks that tell whether SFT worked on it.

The tiny base (``data/tiny_base``, pretrained by ``tools/tiny_base.py``) read simple English about the things of
``data/tiny_base/world.txt``; the SFT dialogues (``tools/tiny_dialogues.py``) ask about each thing in three of six
ways and answer in a pirate's voice under the card's pirate system prompt, plainly otherwise. ``CHECK_QUESTIONS``
are never asked in the sample data: each asks about a thing the dialogues mention, in a way they never ask about
it, so the answer's facts must come from pretraining.

``check_answers`` samples eight answers per question (one batch, seed 0, the card's sampling settings) and counts,
per question: answers that stop at ``</s>`` with no turn marker (``<|``) in them, answers in a pirate's voice,
answers about the thing asked (the first thing of the world they name is that thing), and answers without invented
words (every word is one the tiny world uses). An answer that writes a turn marker is counted once, as no stop.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from utils import DATA_DIR

WORLD_FILE = DATA_DIR / "tiny_base" / "world.txt"
VOCABULARY_FILE = DATA_DIR / "tiny_base" / "vocabulary.txt"  # every word of the pretraining text and the dialogues
PIRATE_SYSTEM = "You are a friendly chatbot who always responds in the style of a pirate"
# Never asked in the sample data (tests/test_tiny_world.py checks it): things the dialogues ask about in other ways.
CHECK_QUESTIONS = (
    "Tell me about a banana.",
    "Tell me about a mouse.",
    "What does a wave do?",
    "Tell me about a bucket.",
    "What does a key do?",
    "Where can I find a cat?",
    "Where can I find a boat?",
    "What does a duck do?",
    "Tell me about a dog.",
    "Tell me about a doctor.",
    "Tell me about a goat.",
)
PIRATE_WORDS = re.compile(  # "be" counts after a word that is not "to", "not" or a modal verb ("it be", "map be")
    r"\b(arr+|ahoy|mateys?|ye|yer|aye|me hearties|me hearty|landlubbers?|yo ho|shiver me timbers|"
    r"(?!(?:to|not|can|could|will|would|shall|should|may|might|must|cannot|never|always|also|let)\b)[a-z']+ be)\b",
    re.IGNORECASE,
)


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


@functools.lru_cache(maxsize=2)
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


# --- what an answer shows ----------------------------------------------------------------------------------------
def pirate_words(text: str) -> list[str]:
    """The pirate words and phrases in ``text``, lower-cased: "arr", "ahoy", "matey", "ye", "yer", "aye",
    "me hearty", "landlubber", "yo ho", "shiver me timbers", and "be" used for "is" or "are" ("it be", "map be")."""
    return [m.group(0).lower() for m in PIRATE_WORDS.finditer(text)]


def is_pirate(text: str) -> bool:
    """Talks like a pirate: two or more pirate words, or nothing but pirate words ("Arr!")."""
    found, words = pirate_words(text), _words(text)
    return len(found) >= 2 or (len(found) == 1 and len(words) == len(found[0].split()))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@functools.lru_cache(maxsize=1)
def _names() -> tuple[re.Pattern, dict[str, str]]:
    names = {form: t.name for t in world() for form in (t.name, t.plural)}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b", re.I)
    return pattern, names


def first_thing(text: str) -> str | None:
    """The first thing of the world ``text`` names (by its name or plural), or None."""
    pattern, names = _names()
    match = pattern.search(text)
    return names[match.group(1).lower()] if match else None


def is_about(answer: str, question: str) -> bool:
    """The answer is about the thing the question asks about: the first thing it names is that thing."""
    asked = first_thing(question)
    return asked is not None and first_thing(answer) == asked


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word the tiny world uses (``data/tiny_base/vocabulary.txt``, written by ``tools/tiny_dialogues.py``)."""
    return frozenset(VOCABULARY_FILE.read_text(encoding="utf-8").split())


def invented_words(text: str) -> list[str]:
    """The words of ``text`` the tiny world never uses ("lkins", "coc"): pieces of words glued wrongly."""
    return [w for w in _words(text) if w not in vocabulary()]


def world_share(text: str) -> float:
    """The share of ``text``'s words that are words of the tiny world (0 for a text without words)."""
    words = _words(text)
    return sum(w in vocabulary() for w in words) / len(words) if words else 0.0


@dataclass
class Checks:
    """Sampled answers to one question, under one system prompt, and what they show."""

    system: str | None
    question: str
    answers: list = field(default_factory=list)  # utils.sampling.Answer

    @property
    def stops(self) -> int:
        """Answers that end with ``</s>`` within the budget and contain no turn marker (``<|``)."""
        return sum(a.stopped_at_eos and "<|" not in a.text for a in self.answers)

    @property
    def pirate(self) -> int:
        """Answers in a pirate's voice (``is_pirate``)."""
        return sum(is_pirate(a.text) for a in self.answers)

    @property
    def about(self) -> int:
        """Answers about the thing asked (``is_about``)."""
        return sum(is_about(a.text, self.question) for a in self.answers)

    @property
    def clean(self) -> int:
        """Answers with no invented word (``invented_words``). One that writes a turn marker (``<|``) is counted by
        ``stops``: it is not a stop, whatever its words."""
        return sum(not invented_words(a.text) for a in self.answers)


def check_answers(
    model, tokenizer, questions, system: str | None = None, samples: int = 8, max_new_tokens: int = 64
) -> list[Checks]:
    """Ask each of ``questions`` after ``system`` (the card's empty system turn when None, as in its training data),
    ``samples`` times, all in one batch (seed 0), sampling as the card does (temperature 0.7, top_k 50, top_p 0.95):
    each row of the batch draws its own tokens."""
    from utils.sampling import generate

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system or ""}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    answers = generate(
        model, tokenizer, [p for p in prompts for _ in range(samples)], seed=0, max_new_tokens=max_new_tokens
    )
    return [Checks(system, q, answers[i * samples : (i + 1) * samples]) for i, q in enumerate(questions)]


def check_model(model, tokenizer, questions=CHECK_QUESTIONS, max_new_tokens: int = 64) -> dict[str, list[Checks]]:
    """``check_answers`` with the pirate system prompt ("pirate") and without one ("plain": the empty system turn)."""
    return {
        "pirate": check_answers(model, tokenizer, questions, PIRATE_SYSTEM, max_new_tokens=max_new_tokens),
        "plain": check_answers(model, tokenizer, questions, None, max_new_tokens=max_new_tokens),
    }


# The demo's claims, per question, out of 8 answers (issue 27): what notebook 05 and bench/tiny_sft_check.py count.
CLAIMS = {
    "pirate voice with the pirate prompt": ("pirate", "pirate", ">=", 7),
    "pirate voice without it": ("plain", "pirate", "<=", 1),
    "stop at </s>": (None, "stops", ">=", 7),
    "about the thing asked": (None, "about", ">=", 6),
    "no invented words": (None, "clean", ">=", 7),
}


def claims_held(results: dict[str, list[Checks]]) -> dict[str, tuple[int, int]]:
    """For each claim of ``CLAIMS``: (questions where it held, questions counted), over the modes it concerns."""
    held = {}
    for claim, (mode, measure, sign, bound) in CLAIMS.items():
        rows = [c for m, checks in results.items() if mode in (None, m) for c in checks]
        ok = [getattr(c, measure) >= bound if sign == ">=" else getattr(c, measure) <= bound for c in rows]
        held[claim] = (sum(ok), len(ok))
    return held


# --- what a loss curve shows ---------------------------------------------------------------------------------------
MIN_LOSSES = 20  # a first and a last tenth of at least 2 logged losses each


def loss_ends(losses: list[float]) -> tuple[float, float] | None:
    """The medians of the first and the last tenth of the logged losses: where the training loss started and ended.
    Medians, because one packed row of hard dialogues can double a single step's loss. None for fewer than
    ``MIN_LOSSES`` losses: a tenth of them would be one step, which says nothing about the run."""
    if len(losses) < MIN_LOSSES:
        return None
    k = len(losses) // 10
    return statistics.median(losses[:k]), statistics.median(losses[-k:])


def loss_line(losses: list[float]) -> str:
    """ "train loss A -> B (medians ...)", or why a run this short has no such line."""
    ends = loss_ends(losses)
    if ends is None:
        last = f"; its last logged loss was {losses[-1]:.3f}" if losses else ""
        return (
            f"train loss: {len(losses)} logged step(s), too few for the medians of a first and last tenth "
            f"({MIN_LOSSES} needed){last}"
        )
    return f"train loss {ends[0]:.3f} -> {ends[1]:.3f} (medians of the first and last tenth of {len(losses)} steps)"


def loss_halved(losses: list[float]) -> bool:
    """The training loss at least halved (``loss_ends``); False when the run logged too few losses to tell."""
    ends = loss_ends(losses)
    return ends is not None and ends[1] <= 0.5 * ends[0]


def epoch_losses(history: list[dict]) -> list[tuple[int, int, float, float]]:
    """Per epoch of a run's ``log_history``: (epoch, logged steps, median of their losses, the last one's loss). The
    trainer's table shows only the last, one packed row's loss, so two epochs can swap places there; the medians
    cannot be moved by one row."""
    epochs: dict[int, list[float]] = {}
    for h in history:
        if "loss" in h and h.get("epoch") is not None:
            epochs.setdefault(max(1, math.ceil(round(h["epoch"], 6))), []).append(h["loss"])
    return [(e, len(losses), statistics.median(losses), losses[-1]) for e, losses in sorted(epochs.items())]


def epoch_lines(history: list[dict]) -> list[str]:
    """One line per epoch: the median of its logged losses beside its last logged one (what the trainer's table shows
    at the end of the epoch)."""
    return [
        f"epoch {epoch}: median {median:.3f} over its {steps} logged steps (its last step, in the table: {last:.3f})"
        for epoch, steps, median, last in epoch_losses(history)
    ]


# --- trained on or held out: overfitting ----------------------------------------------------------------------------
OVERFIT_MARGIN = 0.10  # held-out loss more than 10% above the trained-on loss of the same kind of dialogue
_MARKER = re.compile(r"<\|\w+\|>")


def dialogue_kind(text: str) -> str:
    """ "tiny world" for a dialogue every word of which the tiny world uses (its template markers aside), else
    "general": the sample's hand-written dialogues about food waste or passwords, which the tiny base never read."""
    return "tiny world" if world_share(_MARKER.sub(" ", text)) >= 0.95 else "general"


@dataclass
class HeldOut:
    """A trained model's loss per token on dialogues it trained on ("train") and on held-out ones ("test"), by kind
    of dialogue, and each kind's share of each split's tokens."""

    losses: dict[str, dict[str, tuple[float, int]]]  # kind -> split -> (loss per token, dialogues measured)
    shares: dict[str, dict[str, float]]  # kind -> split -> share of the split's tokens

    def table(self) -> list[str]:
        lines = ["loss per token of the trained model, on dialogues it trained on and on held-out ones:"]
        for kind, by_split in self.losses.items():
            (a, n), (b, m) = by_split["train"], by_split["test"]
            lines.append(f"  {kind:10s}  trained on {a:.3f} ({n} dialogues)   held out {b:.3f} ({m} dialogues)")
        return lines

    def overfit(self, margin: float = OVERFIT_MARGIN) -> dict[str, float]:
        """Kind -> how far (a share) its held-out loss is above its trained-on loss, where that is beyond ``margin``."""
        gaps = {k: s["test"][0] / s["train"][0] - 1 for k, s in self.losses.items() if s["train"][0] > 0}
        return {k: gap for k, gap in gaps.items() if gap > margin}

    def verdict(self, train_end: float | None, eval_loss: float | None, margin: float = OVERFIT_MARGIN) -> list[str]:
        """What the numbers say about overfitting, and, without it, why the eval loss is above the train loss."""
        over = self.overfit(margin)
        if over:
            kind = max(over, key=over.get)
            (a, _), (b, _) = self.losses[kind]["train"], self.losses[kind]["test"]
            what = "" if kind == "all" else f"{kind} "
            return [
                f"Overfitting: on held-out {what}dialogues the loss is {over[kind]:.0%} above the loss on those it "
                f"trained on ({b:.3f} against {a:.3f}): the model has memorised its training dialogues beyond what "
                "carries over to new ones."
            ]
        lines = [
            f"No sign of overfitting: on held-out dialogues of each kind the loss is at most {margin:.0%} above the "
            "loss on those it trained on."
        ]
        if train_end is None or eval_loss is None or eval_loss <= train_end * (1 + margin):
            return lines
        hardest = max(self.losses, key=lambda k: self.losses[k]["test"][0])
        test, train = self.shares[hardest]["test"], self.shares[hardest]["train"]
        if len(self.losses) > 1 and test > train:
            lines.append(
                f"The eval loss is above the train loss for another reason: {hardest} dialogues, which the model "
                f"predicts worst whether it trained on them or not, are {test:.0%} of the test split's tokens and "
                f"{train:.0%} of the training split's."
            )
        else:
            lines.append(
                "The eval loss and the train loss average over different rows: the trained-on and held-out losses "
                "above are the like-for-like comparison."
            )
        return lines


def held_out_losses(model, tokenizer, data: dict, max_length: int, kinds: bool = True, per_kind: int = 64) -> HeldOut:
    """``model``'s loss per token on up to ``per_kind`` dialogues of each kind (``dialogue_kind``; one kind, "all",
    when ``kinds`` is False, as for ultrachat_200k, whose splits are not read whole) of ``data``'s train and test
    splits, evenly spread over each: ``input_ids`` cut at ``max_length`` as packing cuts them, the loss on the
    answers' tokens only where an ``assistant_masks`` column says so."""
    import torch

    device = next(model.parameters()).device
    losses: dict[str, dict[str, tuple[float, int]]] = {}
    shares: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for split in ("train", "test"):
            rows = data[split]
            if kinds:  # the sample: a few hundred rows, read whole
                ids = [row[:max_length] for row in rows["input_ids"]]
                kind_of = [dialogue_kind(tokenizer.decode(row, skip_special_tokens=True)) for row in ids]
            else:
                kind_of = ["all"] * rows.num_rows
            for kind in sorted(set(kind_of), key=lambda k: k != "tiny world"):
                chosen = [i for i, k in enumerate(kind_of) if k == kind]
                if kinds:
                    part = sum(len(ids[i]) for i in chosen) / sum(len(row) for row in ids)
                    shares.setdefault(kind, {"train": 0.0, "test": 0.0})[split] = part
                chosen = chosen[:: max(1, len(chosen) // per_kind)][:per_kind]
                summed = counted = 0.0
                for row in rows.select(chosen):
                    x = torch.tensor([row["input_ids"][:max_length]], device=device)
                    labels = x.clone()
                    if row.get("assistant_masks") is not None:
                        labels[0, torch.tensor(row["assistant_masks"][:max_length], device=device) == 0] = -100
                    n = int((labels[0, 1:] != -100).sum())
                    if n:
                        with torch.no_grad():
                            summed += float(model(input_ids=x, labels=labels).loss) * n
                        counted += n
                losses.setdefault(kind, {})[split] = (summed / counted if counted else float("nan"), len(chosen))
    finally:
        model.train(was_training)
    return HeldOut({k: v for k, v in losses.items() if len(v) == 2}, shares)
