"""The embedded default's small world (``data/tiny_base/world.txt``), and the checks that SFT worked on it: its answers,
its loss curve, its loss on held-out dialogues."""

from __future__ import annotations

import functools
import math
import re
import statistics
from dataclasses import dataclass

from utils import DATA_DIR

WORLD_FILE = DATA_DIR / "tiny_base" / "world.txt"
VOCABULARY_FILE = DATA_DIR / "tiny_base" / "vocabulary.txt"  # every word of the pretraining text and the dialogues
PIRATE_SYSTEM = "You are a friendly chatbot who always responds in the style of a pirate"
# The SFT dialogues ask about each thing in three of six ways (tools/tiny_dialogues.py); these ask in ways they never
# do (tests/test_tiny_world.py checks it), so the answers' facts must come from pretraining (tools/tiny_base.py).
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
SAMPLES = 8  # answers per question and system prompt
PIRATE_WORDS = re.compile(  # "be" counts after a word that is not "to", "not" or a modal verb ("it be", "map be")
    r"\b(arr+|ahoy|mateys?|ye|yer|aye|me hearties|me hearty|landlubbers?|yo ho|shiver me timbers|"
    r"(?!(?:to|not|can|could|will|would|shall|should|may|might|must|cannot|never|always|also|let)\b)[a-z']+ be)\b",
    re.IGNORECASE,
)


def pirate_words(text: str) -> list[str]:
    return [m.group(0).lower() for m in PIRATE_WORDS.finditer(text)]


def is_pirate(text: str) -> bool:
    """Talks like a pirate: two or more pirate words, or nothing but pirate words ("Arr!")."""
    found = pirate_words(text)
    return len(found) >= 2 or (len(found) == 1 and len(_words(text)) == len(found[0].split()))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    """Every thing's name and plural (a line's first two fields, one word each) -> its name."""
    lines = WORLD_FILE.read_text(encoding="utf-8").splitlines()
    fields = [line.split(" | ") for line in lines if line.strip() and not line.startswith("#")]
    return {word.strip(): f[0].strip() for f in fields for word in f[:2]}


def first_thing(text: str) -> str | None:
    """The first thing of the world ``text`` names (by its name or plural, as a whole word), or None."""
    return next((_names()[w] for w in re.findall(r"\w+", text.lower()) if w in _names()), None)


def is_about(answer: str, question: str) -> bool:
    asked = first_thing(question)
    return asked is not None and first_thing(answer) == asked


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word the tiny world uses (written by ``tools/tiny_dialogues.py``)."""
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
    """Sampled answers (``utils.sampling.Answer``) to one question under one system prompt, and what they show."""

    system: str | None
    question: str
    answers: list

    def __post_init__(self):
        texts = [a.text for a in self.answers]
        # a stop ends with </s> within the budget and writes no turn marker ("<|"), which is no invented word
        self.stops = sum(a.stopped_at_eos and "<|" not in a.text for a in self.answers)
        self.pirate = sum(map(is_pirate, texts))
        self.about = sum(is_about(t, self.question) for t in texts)
        self.clean = sum(not invented_words(t) for t in texts)


def check_model(model, tokenizer, questions=CHECK_QUESTIONS) -> dict[str, list[Checks]]:
    """``SAMPLES`` answers to each question with the pirate system prompt ("pirate") and the card's empty system turn
    of its training data ("plain"): one batch per mode, seed 0, the card's sampling settings."""
    from utils.sampling import generate

    results = {}
    for mode, system in (("pirate", PIRATE_SYSTEM), ("plain", None)):
        chats = [[{"role": "system", "content": system or ""}, {"role": "user", "content": q}] for q in questions]
        prompts = tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        asked = [p for p in prompts for _ in range(SAMPLES)]
        answers = generate(model, tokenizer, asked, seed=0, max_new_tokens=64)
        results[mode] = [Checks(system, q, answers[i * SAMPLES : (i + 1) * SAMPLES]) for i, q in enumerate(questions)]
    return results


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
        counts = [getattr(c, measure) for m, checks in results.items() if mode in (None, m) for c in checks]
        held[claim] = (sum(n >= bound if sign == ">=" else n <= bound for n in counts), len(counts))
    return held


# --- what a loss curve shows ---------------------------------------------------------------------------------------
MIN_LOSSES = 20  # a first and a last tenth of at least 2 logged losses each


def loss_ends(losses: list[float]) -> tuple[float, float] | None:
    """The medians of the first and the last tenth of the logged losses (one packed row of hard dialogues can double
    a step's loss); None for fewer than ``MIN_LOSSES``, where a tenth would be one step."""
    if len(losses) < MIN_LOSSES:
        return None
    k = len(losses) // 10
    return statistics.median(losses[:k]), statistics.median(losses[-k:])


def loss_line(losses: list[float]) -> str:
    """ "train loss A -> B (medians ...)", or why a run this short has no such line."""
    ends = loss_ends(losses)
    if ends:
        return f"train loss {ends[0]:.3f} -> {ends[1]:.3f} (medians of the first and last tenth of {len(losses)} steps)"
    last = f"; its last logged loss was {losses[-1]:.3f}" if losses else ""
    too_few = f"too few for the medians of a first and last tenth ({MIN_LOSSES} needed)"
    return f"train loss: {len(losses)} logged step(s), {too_few}{last}"


def epoch_lines(history: list[dict]) -> list[str]:
    """Per epoch, the median of its logged losses beside its last one, all the trainer's table shows (one packed row's
    loss, by which two epochs can swap places)."""
    epochs: dict[int, list[float]] = {}
    for h in history:
        if "loss" in h and h.get("epoch") is not None:
            epochs.setdefault(max(1, math.ceil(round(h["epoch"], 6))), []).append(h["loss"])
    return [
        f"epoch {epoch}: median {statistics.median(losses):.3f} over its {len(losses)} logged steps (its last step, "
        f"in the table: {losses[-1]:.3f})"
        for epoch, losses in sorted(epochs.items())
    ]


# --- trained on or held out: overfitting ----------------------------------------------------------------------------
def dialogue_kind(text: str) -> str:
    """ "tiny world" for a dialogue every word of which the tiny world uses (its template markers aside), else
    "general": the sample's hand-written dialogues about food waste or passwords, which the tiny base never read."""
    return "tiny world" if world_share(re.sub(r"<\|\w+\|>", " ", text)) >= 0.95 else "general"


@dataclass
class HeldOut:
    """Loss per token on trained-on ("train") and held-out ("test") dialogues by kind, and each kind's token share."""

    losses: dict[str, dict[str, tuple[float, int]]]  # kind -> split -> (loss per token, dialogues measured)
    shares: dict[str, dict[str, float]]  # kind -> split -> share of the split's tokens

    def table(self) -> list[str]:
        lines = ["loss per token of the trained model, on dialogues it trained on and on held-out ones:"]
        for kind, by_split in self.losses.items():
            (a, n), (b, m) = by_split["train"], by_split["test"]
            lines.append(f"  {kind:10s}  trained on {a:.3f} ({n} dialogues)   held out {b:.3f} ({m} dialogues)")
        return lines

    def verdict(self, train_end: float | None, eval_loss: float | None) -> list[str]:
        """Overfitting where a kind's held-out loss is over 10% above its trained-on loss; else why eval > train."""
        gaps = {k: s["test"][0] / s["train"][0] - 1 for k, s in self.losses.items() if s["train"][0] > 0}
        over = {k: gap for k, gap in gaps.items() if gap > 0.1}  # not a NaN: a kind without a token to measure
        if over:
            kind = max(over, key=over.get)
            (a, _), (b, _) = self.losses[kind]["train"], self.losses[kind]["test"]
            return [
                f"Overfitting: on held-out {'' if kind == 'all' else kind + ' '}dialogues the loss is {over[kind]:.0%} "
                f"above the loss on those it trained on ({b:.3f} against {a:.3f}): the model has memorised its "
                "training dialogues beyond what carries over to new ones."
            ]
        lines = [
            "No sign of overfitting: on held-out dialogues of each kind the loss is at most 10% above the loss on "
            "those it trained on."
        ]
        if train_end is None or eval_loss is None or eval_loss <= train_end * 1.1:
            return lines
        hardest = max(self.losses, key=lambda k: self.losses[k]["test"][0])
        test, train = self.shares[hardest]["test"], self.shares[hardest]["train"]
        if len(self.losses) > 1 and test > train:
            return lines + [
                f"The eval loss is above the train loss for another reason: {hardest} dialogues, which the model "
                f"predicts worst whether it trained on them or not, are {test:.0%} of the test split's tokens and "
                f"{train:.0%} of the training split's."
            ]
        return lines + [
            "The eval loss and the train loss average over different rows: the trained-on and held-out losses above "
            "are the like-for-like comparison."
        ]


def held_out_losses(model, tokenizer, data: dict, max_length: int, kinds: bool = True) -> HeldOut:
    """``model``'s loss per token on up to 64 dialogues, evenly spread, of each kind (``dialogue_kind``; one kind,
    "all", without ``kinds``, as for ultrachat_200k, whose splits are not read whole) of ``data``'s train and test
    splits: cut at ``max_length`` as packing cuts them, on the answers only where ``assistant_masks`` says so."""
    import torch

    device = next(model.parameters()).device
    losses, shares = {}, {}
    was_training = model.training
    model.eval()
    try:
        for split in ("train", "test"):
            rows = data[split]
            kind_of = ["all"] * rows.num_rows
            if kinds:  # the sample: a few hundred rows, read whole
                ids = [row[:max_length] for row in rows["input_ids"]]
                kind_of = [dialogue_kind(tokenizer.decode(row, skip_special_tokens=True)) for row in ids]
            for kind in sorted(set(kind_of), key=lambda k: k != "tiny world"):
                chosen = [i for i, k in enumerate(kind_of) if k == kind]
                if kinds:
                    part = sum(len(ids[i]) for i in chosen) / sum(len(row) for row in ids)
                    shares.setdefault(kind, {"train": 0.0, "test": 0.0})[split] = part
                chosen = chosen[:: max(1, len(chosen) // 64)][:64]
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
