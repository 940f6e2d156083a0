"""A tiny base model that knows some English but not the chat template: the embedded default's starting point.

    python -m tools.tiny_base             # pretrain from scratch into data/tiny_base/ (4 CPU-minutes, one thread)
    python -m tools.tiny_base --check     # load the shipped weights and print a continuation

The model has the shape of ``TINY_MISTRAL`` (4,317,760 parameters, the real 32,000-piece Mistral
tokenizer). Its text is generated here from the hand-written facts of ``data/tiny_base/world.txt``: descriptions,
comparisons, short explanations, small tables and stories, a few with pirates who talk like pirates, and questions
answered in a named speaker's voice (a pirate's half the time: "Answer in the style of a pirate. What is a cat? Arr,
..."; the questions of the SFT dialogues, ``tools.tiny_dialogues.FORMS``), so that the base knows, as any large
base model does, that the word "pirate" before an answer decides how it sounds, and that an answer names the thing
its question asks about. It is plain text with no chat-template marker; a page of 12 to 30 paragraphs (~1,200
tokens) goes from BOS to EOS, so the base knows the EOS token but not ``<|user|>`` or ``<|assistant|>``, nor that an
answer ends after a few sentences, nor that a system prompt is an instruction. SFT (notebook 02) teaches it that.

Each step's softmax covers the corpus's ~1,100 distinct tokens plus 512 others drawn at random (about 5x faster on a
CPU than all 32,000); the held-out loss over the full vocabulary matches the training loss, so nothing leaks to the
tokens the corpus never uses.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.tiny_dialogues import CLOSERS, FORMS, OPENERS, Thing, cap, colour, piratify, world
from utils import DATA_DIR

BASE_DIR = DATA_DIR / "tiny_base"
# A Mistral-7B in miniature: same vocabulary, GQA, RoPE and sliding-window settings, 4 layers of width 64.
TINY_MISTRAL = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    sliding_window=4096,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
PEOPLE = {"Anna": "she", "Tom": "he", "Mia": "she", "Sam": "he", "Lily": "she", "Ben": "he", "Rosa": "she", "Leo": "he"}
CAPTAINS = ("Captain Redbeard", "Captain Flint", "Old Peg", "Captain Morgan", "Salty Sue", "One-Eyed Jim")
SIZES = {1: "tiny", 2: "small", 3: "medium", 4: "big", 5: "huge"}
LIKED = ("animal", "bird", "insect", "food", "nature", "place")


# --- the pretraining text --------------------------------------------------------------------------------------------
def describe(rng: random.Random, thing: Thing, things: list[Thing]) -> str:
    """A short paragraph about one thing, its sentences in a random order after the first."""
    t = thing
    sentences = [
        f"{cap(t.a)} {t.does}.",
        f"You can find {t.plural} {t.place}.",
        t.fact,
        f"People {'like' if t.kind in LIKED else 'need'} {t.plural} because {t.a} {t.does}.",
    ]
    if t.colour:
        sentences.append(rng.choice([f"Most {t.plural} are {t.colour}.", f"{cap(t.a)} is often {t.colour}."]))
    other = rng.choice([o for o in things if o.kind == t.kind and o.size != t.size] or things)
    if other.size != t.size:
        big, small = (t, other) if t.size > other.size else (other, t)
        sentences.append(f"{cap(big.a)} is bigger than {small.a}.")
    rng.shuffle(sentences)
    first = rng.choice([f"{cap(t.a)} is {t.what}.", f"This is about {t.plural}. {cap(t.a)} is {t.what}."])
    return " ".join([first, *sentences[: rng.randint(2, len(sentences))]])


def compare(rng: random.Random, things: list[Thing]) -> str:
    """Two things side by side: which is bigger, what each is and does."""
    a, b = rng.sample(things, 2)
    if a.size == b.size:
        size = f"{cap(a.a)} and {b.a} are about the same size."
    else:
        big, small = (a, b) if a.size > b.size else (b, a)
        size = rng.choice([f"{cap(big.a)} is bigger than {small.a}.", f"{cap(small.a)} is smaller than {big.a}."])
    return f"{cap(a.a)} is {a.what}, and {b.a} is {b.what}. {size} {cap(a.a)} {a.does}, but {b.a} {b.does}."


def explain(rng: random.Random, things: list[Thing]) -> str:
    """A short explanation (what people keep a thing for), a list of one kind of thing, a small table, or things in
    order of size."""
    t = rng.choice([x for x in things if x.kind in ("thing", "tool")])
    kind = rng.choice(["animal", "bird", "food", "thing", "place", "vehicle", "nature"])
    group = rng.sample([x for x in things if x.kind == kind], 3)
    choice = rng.randrange(4)
    if choice == 0:
        why = f"Why do people keep {t.plural} {t.place}? Because {t.a} {t.does}."
        return f"{why} {t.fact} That is why {t.plural} are useful."
    if choice == 1:
        plural = kind if kind in ("food", "nature") else kind + "s"
        return f"Here are three {plural}: {group[0].plural}, {group[1].plural} and {group[2].plural}. " + " ".join(
            f"{cap(x.a)} is {x.what}." for x in group
        )
    if choice == 2:
        rows = [f"{x.name}|{SIZES[x.size]}|{x.colour or 'many colours'}" for x in group]
        return "\n".join(["A small table of " + kind + " facts:", "name|size|colour", *rows])
    ordered = sorted({x.size: x for x in rng.sample(things, 6)}.values(), key=lambda x: x.size)
    if rng.random() < 0.5:
        return "From small to big: " + "<".join(x.plural for x in ordered) + "."
    return "From big to small: " + ">".join(x.plural for x in reversed(ordered)) + "."


def story(rng: random.Random, things: list[Thing]) -> str:
    """A few sentences about a person who goes somewhere and sees something."""
    name = rng.choice(list(PEOPLE))
    he = PEOPLE[name]
    place = rng.choice([x for x in things if x.kind == "place"])
    seen = rng.choice([x for x in things if x.kind in ("animal", "bird", "insect", "thing", "nature")])
    food = rng.choice([x for x in things if x.kind == "food"])
    when = rng.choice(["One morning", "One sunny day", "Last summer", "On a cold evening", "Early one day"])
    lines = [
        f"{when}, {name} went to the {place.name}.",
        f"There {he} saw {seen.a}.",
        f"{cap(seen.a)} {seen.does}, and {name} watched it for a long time.",
        f"{name} ate {food.a} and thought about the {seen.name}.",
        rng.choice([f"Then {he} went home happy.", f"{name} told a friend about the {seen.name}.", seen.fact]),
    ]
    return " ".join(lines)


def pirate_story(rng: random.Random, things: list[Thing]) -> str:
    """A story with a pirate captain, who speaks like a pirate (inside quotation marks)."""
    captain, ship = (
        rng.choice(CAPTAINS),
        rng.choice(["the Black Gull", "the Sea Wolf", "the Red Wave", "the Salty Dog"]),
    )
    t = rng.choice(things)
    island = rng.choice(["a small island", "a green island", "a rocky island", "a far island"])
    speech = f"{rng.choice(OPENERS)} {piratify(f'{cap(t.a)} is {t.what}. It {t.does}.')} {rng.choice(CLOSERS)}"
    lines = [
        f"{captain} was a pirate who sailed the ship {ship}.",
        rng.choice([f"One day the crew sailed to {island}.", "One night a storm shook the ship.", ""]),
        f'A young sailor pointed at {t.a} and asked what it was. "{speech.strip()}" said {captain}.',
        rng.choice(['"Aye, aye, captain!" shouted the crew.', '"Ahoy!" shouted the sailor from the top of the mast.']),
        rng.choice(["They found a chest of gold on the beach.", "Then the pirates sang a song about the sea.", ""]),
    ]
    return " ".join(line for line in lines if line)


VOICES = ("pirate", "teacher", "farmer", "librarian", "doctor", "gardener")
FRAMES = (  # where the speaker is named, then the question, then the answer in that speaker's voice
    'Someone asked a {role}: "{q}" The {role} said: "{a}"',
    "Answer in the style of a {role}. {q} {a}",
    "How would a {role} answer the question {q} Like this: {a}",
    "Here is a question for a {role}.\n{q}\n{a}",
    "{Name} always talks like a {role}. {Name} was asked: {q} {He} said: {a}",
)


def answered(rng: random.Random, things: list[Thing]) -> str:
    """A question of the SFT dialogues' forms about one thing, answered in someone's voice: a pirate's (half the
    time) or a plain speaker's. The speaker is named before the question, as an instruction is, so the base learns
    that the word "pirate" earlier in a text decides how the answer after it sounds (what a 7B base has read many
    times), and that an answer names the thing its question asks about."""
    t = rng.choice(things)
    form = rng.choice([f for f in FORMS if t.colour or f is not colour])
    other = rng.choice([o for o in things if o.size != t.size and o is not t])
    questions, a = form(t, other)
    q = rng.choice(questions)
    role = "pirate" if rng.random() < 0.5 else rng.choice(VOICES[1:])
    if role == "pirate":
        a = f"{rng.choice(OPENERS)} {piratify(a)} {rng.choice(CLOSERS)}".strip()
    name = rng.choice(list(PEOPLE))
    he = cap(PEOPLE[name])
    return rng.choice(FRAMES).format(role=role, q=q, a=a, Name=name, He=he)


ANSWERED_SHARE = 0.35  # of the paragraphs; the other kinds keep their proportions
OTHER_KINDS = ((describe, 0.37), (compare, 0.13), (explain, 0.17), (story, 0.13), (pirate_story, 0.04))
KINDS = (
    *((kind, weight * (1 - ANSWERED_SHARE) / (1 - 0.16)) for kind, weight in OTHER_KINDS),
    (answered, ANSWERED_SHARE),
)
PAGE_PARAGRAPHS = (12, 30)  # a page (one document between BOS and EOS) is about 1,200 tokens


def corpus(n_docs: int = 30_000, seed: int = 0, things: list[Thing] | None = None) -> list[str]:
    """``n_docs`` plain-text paragraphs, the same for the same seed."""
    rng = random.Random(seed)
    things = things or world()
    makers, weights = zip(*KINDS, strict=True)
    docs = []
    for _ in range(n_docs):
        maker = rng.choices(makers, weights)[0]
        docs.append(maker(rng, rng.choice(things), things) if maker is describe else maker(rng, things))
    return docs


def pages(docs: list[str], seed: int = 0) -> list[str]:
    """The paragraphs grouped into pages of ``PAGE_PARAGRAPHS`` paragraphs, one per line."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(docs):
        n = rng.randint(*PAGE_PARAGRAPHS)
        out.append("\n".join(docs[i : i + n]))
        i += n
    return out


# --- pretraining -----------------------------------------------------------------------------------------------------
@dataclass
class PretrainConfig:
    """Everything that decides the weights (with the corpus, from ``seed``)."""

    seed: int = 0
    docs: int = 30_000
    seq_len: int = 256
    batch: int = 16
    epochs: float = 2.0
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    negatives: int = 512  # tokens outside the corpus in each step's softmax
    threads: int = 1  # one thread: the same sums in the same order on every run (and 2 shared cores stay usable)


def token_windows(tokenizer, docs: list[str], seq_len: int):
    """The pages, each BOS + text + EOS, as one stream cut into rows of ``seq_len`` tokens.

    EOS ends a page of ~1,200 tokens, never a paragraph: the base knows the token, not when an answer ends.
    """
    import torch

    ids = [i for doc in tokenizer(docs)["input_ids"] for i in [*doc, tokenizer.eos_token_id]]
    stream = torch.tensor(ids[: len(ids) // seq_len * seq_len])
    return stream.view(-1, seq_len)


def sampled_loss(model, rows, known, negatives: int, generator):
    """Next-token loss with the softmax over ``known`` tokens plus ``negatives`` others drawn at random (0: all)."""
    import torch
    import torch.nn.functional as F

    hidden = model.model(input_ids=rows).last_hidden_state[:, :-1]
    targets = rows[:, 1:].contiguous()
    weight = model.lm_head.weight
    if negatives:
        vocab = weight.shape[0]
        others = torch.randint(0, vocab, (negatives,), generator=generator)
        candidates = torch.unique(torch.cat([known, others]))  # sorted, so a target's index is searchsorted
        targets = torch.searchsorted(candidates, targets)
        weight = weight[candidates]
    logits = hidden @ weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def pretrain(config: PretrainConfig, tokenizer=None, log_every: int = 50):
    """Pretrain the tiny Mistral on ``corpus(config.docs, config.seed)``; return (model, record of the run)."""
    import math

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from utils.assets import load_tokenizer

    torch.set_num_threads(config.threads)
    tokenizer = tokenizer or load_tokenizer(None)
    start, cpu = time.perf_counter(), time.process_time()
    text = pages(corpus(config.docs, config.seed), config.seed)
    rows = token_windows(tokenizer, text, config.seq_len)
    known = torch.unique(rows)
    torch.manual_seed(config.seed)
    model = MistralForCausalLM(MistralConfig(**TINY_MISTRAL))
    generator = torch.Generator().manual_seed(config.seed)
    steps = math.ceil(config.epochs * len(rows) / config.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    order, losses = torch.empty(0, dtype=torch.long), []
    model.train()
    for step in range(steps):
        if len(order) < config.batch:
            order = torch.cat([order, torch.randperm(len(rows), generator=generator)])
        batch, order = rows[order[: config.batch]], order[config.batch :]
        loss = sampled_loss(model, batch, known, config.negatives, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    record = {
        "config": asdict(config),
        "corpus_sha256": hashlib.sha256("\f".join(text).encode()).hexdigest(),
        "rows": len(rows),
        "tokens_per_epoch": rows.numel(),
        "corpus_vocabulary": len(known),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "machine": f"{platform.processor() or platform.machine()}, {config.threads} threads, torch {torch.__version__}",
        "loss_first_last": [losses[0], losses[-1]],
        "loss_every_50_steps": losses[::50],
    }
    return model.eval(), record


def heldout_loss(model, tokenizer=None, seed: int = 1, docs: int = 600, seq_len: int = 256) -> float:
    """Mean next-token loss, over all 32,000 tokens, on fresh documents from another seed (unseen rows)."""
    import torch

    from utils.assets import load_tokenizer

    rows = token_windows(tokenizer or load_tokenizer(None), pages(corpus(docs, seed), seed), seq_len)
    with torch.no_grad():
        return round(float(model(input_ids=rows, labels=rows).loss), 4)


# --- shipping and loading ------------------------------------------------------------------------------------------
def save_base(model, record: dict, out_dir: Path = BASE_DIR) -> Path:
    """Write the weights as float16 safetensors (8.6 MB) with config.json and pretraining.json into ``out_dir``.

    The model is left in float32 holding the float16 values, so what it shows afterwards is what ships."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    (out_dir / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
    return out_dir


def load_base(folder: Path = BASE_DIR, dtype: str = "float32"):
    """The shipped tiny base as a ``MistralForCausalLM`` in ``dtype`` (float16 on disk; float32 computes on a CPU)."""
    import torch
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.tiny_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BASE_DIR, help="folder for the weights (default data/tiny_base)")
    parser.add_argument("--docs", type=int, default=PretrainConfig.docs)
    parser.add_argument("--epochs", type=float, default=PretrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--check", action="store_true", help="only load the weights in --out and continue a text")
    args = parser.parse_args(argv)
    from utils.assets import load_tokenizer

    tokenizer = load_tokenizer(None)
    if args.check:
        model = load_base(args.out)
    else:
        model, record = pretrain(PretrainConfig(seed=args.seed, docs=args.docs, epochs=args.epochs), tokenizer)
        record["heldout_loss_full_vocabulary"] = heldout_loss(model, tokenizer)
        save_base(model, record, args.out)
        print(f"pretrained in {record['seconds']} s; held-out loss {record['heldout_loss_full_vocabulary']}")
    print(continue_text(model, tokenizer, "A horse is"))
    return 0


def continue_text(model, tokenizer, text: str, max_new_tokens: int = 40, seed: int = 0) -> str:
    """``text`` and its sampled continuation (the card's sampling settings)."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_k=50, top_p=0.95
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
