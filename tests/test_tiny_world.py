"""The tiny pretrained base, its SFT dialogues and the checks of notebook 05: fast checks only (no SFT, no sampling)."""

import hashlib
import json
import re
from types import SimpleNamespace

import pytest
from helpers import loss_halved

from tools.tiny_base import BASE_DIR, corpus
from tools.tiny_dialogues import (
    FORMS_PER_THING,
    NEUTRAL_SYSTEMS,
    OUT_DIR,
    TEST_FILE,
    TRAIN_FILE,
    dialogues,
    piratify,
    vocabulary,
    world,
)
from utils import SAMPLE_DIR
from utils.tiny_world import (
    CHECK_QUESTIONS,
    PIRATE_SYSTEM,
    VOCABULARY_FILE,
    Checks,
    HeldOut,
    claims_held,
    dialogue_kind,
    epoch_lines,
    first_thing,
    invented_words,
    is_about,
    is_pirate,
    loss_ends,
    loss_line,
    pirate_words,
)

MARKERS = ("<|", "|>", "<s>", "</s>", "[INST]")


def test_world_is_well_formed():
    things = world()
    assert len(things) >= 80 and len({t.name for t in things}) == len(things)
    assert all(1 <= t.size <= 5 and t.what and t.place and t.does and t.fact.endswith(".") for t in things)


def test_corpus_is_deterministic_plain_text():
    docs = corpus(400, seed=0)
    assert docs == corpus(400, seed=0) and docs != corpus(400, seed=1)
    assert not any(marker in doc for doc in docs for marker in MARKERS)
    assert any('"Arr' in doc or '"Ahoy' in doc or '"Aye' in doc for doc in docs)  # pirates talk like pirates
    assert sum(PIRATE_SYSTEM in doc for doc in docs) == 0


def test_the_named_speaker_decides_the_voice():
    """The base reads questions answered in a named speaker's voice: a pirate's answers talk like a pirate, the
    others' never do (what SFT later routes the system prompt to)."""
    import random

    from tools.tiny_base import answered

    rng, things = random.Random(0), world()
    texts = [answered(rng, things) for _ in range(200)]
    pirate = [t for t in texts if re.search(r"(asked a|style of a|would a|question for a|talks like a) pirate\b", t)]
    question = re.compile(r"\b(What|Can you|Where|Tell me|Which|Is) [^?.]*[?.]")
    answer = lambda text: question.split(text, maxsplit=1)[-1]  # noqa: E731
    assert 60 < len(pirate) < 140
    assert all(pirate_words(answer(t)) for t in pirate)
    assert not any(pirate_words(answer(t)) for t in texts if t not in pirate)


def test_pages_end_with_eos_and_nothing_else_does(tokenizer):
    from tools.tiny_base import PAGE_PARAGRAPHS, pages, token_windows

    docs = corpus(300, seed=0)
    book = pages(docs, seed=0)
    assert "\n".join(book) == "\n".join(docs) and all(p.count("\n") < PAGE_PARAGRAPHS[1] * 4 for p in book)
    rows = token_windows(tokenizer, book, 64).flatten().tolist()
    ends = [i for i, t in enumerate(rows) if t == tokenizer.eos_token_id]
    assert ends and all(rows[i + 1] == tokenizer.bos_token_id for i in ends if i + 1 < len(rows))
    assert min(b - a for a, b in zip(ends, ends[1:], strict=False)) > 300  # long pages: EOS is rare


def test_piratify():
    assert piratify("You are sure it is your map.") == "Ye be sure it be yer map."
    assert piratify("This island is mine") == "This island be mine"


def test_pirate_detector_on_fixed_strings():
    assert pirate_words("Arr, matey! A cat be small. Ye can find cats in houses.") == ["arr", "matey", "cat be", "ye"]
    assert is_pirate("Ahoy! That be a kettle.") and is_pirate("Aye, me hearty, yer kettle boils water.")
    assert not is_pirate("A kettle is a metal pot. You can find kettles in kitchens.")
    assert not is_pirate("It can be boiled, not to be eaten. Bye! Yesterday the eye of the storm passed.")
    assert is_pirate("Arr!") and is_pirate("Arr.")  # nothing but a pirate's word
    assert not is_pirate("Arr, a kettle is a metal pot.")  # one pirate word in a plain answer


def test_what_an_answer_is_about():
    assert first_thing("You can find a lamp in houses. A clock is on the wall.") == "lamp"
    assert first_thing("You can find mice in fields.") == "mouse" and first_thing("Nothing here.") is None
    assert is_about("Ahoy, matey! Ye can find a lamp in houses.", "Where can I find a lamp?")
    assert not is_about("You can find clocks on walls and desks.", "Where can I find a lamp?")
    assert not is_about("You can find a lamp in houses.", "What is the weather?")  # the question names no thing


def test_invented_words_are_the_ones_the_world_never_uses():
    assert invented_words("Arr, matey! A kettle be a metal pot with a spout. Yo ho ho!") == []
    assert invented_words("You can find lkins in fields and coc works.") == ["lkins", "coc"]
    assert invented_words("A helicopter is a xylophone.") == ["helicopter", "xylophone"]


def _answer(text: str, eos: bool = True):
    return SimpleNamespace(text=text, stopped_at_eos=eos)


def test_checks_count_each_answer_four_ways():
    checks = Checks(
        PIRATE_SYSTEM,
        "Where can I find a lamp?",
        [
            _answer("Arr, matey! Ye can find a lamp in houses."),
            _answer("You can find a lamp in houses.\n<|user|>\nWhat does it do?"),  # wrote the next turn itself
            _answer("Arr ye be lkins", eos=False),
        ],
    )
    assert (checks.stops, checks.pirate, checks.about, checks.clean) == (1, 2, 2, 1)  # "user", "lkins": no words


def test_an_answer_that_writes_a_turn_marker_is_not_a_stop():
    """Every word of these is the tiny world's ("assistant" is, from the neutral system prompts), but each answer
    writes a turn of the template itself: it is not a stop, though it invents no word (counted once, as no stop)."""
    texts = ["A lamp gives light.\n<|assistant|>\nA lamp gives light.", "Arr! A key opens locks. Arr!\n\n<|!"]
    assert all(not invented_words(t) for t in texts)
    checks = Checks(None, "What does a lamp do?", [_answer(t) for t in texts] + [_answer("A lamp gives light.")])
    assert (checks.stops, checks.clean) == (1, 3)


def test_claims_are_counted_per_question():
    def checks(question, texts):
        return Checks(None, question, [_answer(t) for t in texts])

    pirate = "Arr, matey! Ye can find a lamp in houses."
    plain = "You can find a lamp in houses."
    results = {
        "pirate": [checks("Where can I find a lamp?", [pirate] * 8), checks("What is a dog?", [plain] * 8)],
        "plain": [checks("Where can I find a lamp?", [plain] * 7 + [pirate]), checks("What is a dog?", [pirate] * 2)],
    }
    held = claims_held(results)
    assert held["pirate voice with the pirate prompt"] == (1, 2)
    assert held["pirate voice without it"] == (1, 2)  # 1 of 8 is allowed, 2 of 2 is not
    assert held["about the thing asked"] == (2, 4)  # the dog answers name a lamp
    assert held["stop at </s>"] == (3, 4)  # two answers are 2 of 8


def test_loss_ends_need_twenty_logged_losses():
    assert loss_ends([6.0] * 19) is None and not loss_halved([6.0] * 10 + [1.0] * 9)
    assert loss_halved([8.0] * 10 + [5.0] * 80 + [2.0, 9.0] + [2.0] * 8)  # one hard row at the end changes nothing
    assert not loss_halved([8.0] * 10 + [5.0] * 90)
    assert loss_line([10.797] * 8) == (
        "train loss: 8 logged step(s), too few for the medians of a first and last tenth (20 needed); its last "
        "logged loss was 10.797"
    )
    assert loss_line([4.0] * 10 + [2.0] * 10) == (
        "train loss 4.000 -> 2.000 (medians of the first and last tenth of 20 steps)"
    )


def test_dialogues_teach_the_persona_about_every_thing():
    train, test, _ = dialogues()
    assert (train, test) == dialogues()[:2]
    pirate = [r for r in train if r["messages"][0]["content"] == PIRATE_SYSTEM]
    assert all(is_pirate(m["content"]) for r in pirate for m in r["messages"] if m["role"] == "assistant")
    plain = [r for r in train if r not in pirate]
    assert len(pirate) == len(plain) and not any(is_pirate(m["content"]) for r in plain for m in r["messages"])
    neutral = [r["messages"][0]["content"] for r in plain if r["messages"][0]["role"] == "system"]
    assert set(neutral) == set(NEUTRAL_SYSTEMS) and 0.25 < 1 - len(neutral) / len(plain) < 0.55  # 40% none
    assert len(train) == 2 * 2 * FORMS_PER_THING * len(world()) // 2  # a pair per thing and form
    assert {first_thing(r["prompt"]) for r in train} >= {t.name for t in world()} - {"pirate"}
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == len(prompts)
    for r in train + test:
        assert r["prompt"] == next(m["content"] for m in r["messages"] if m["role"] == "user")
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def _asked_in(folder) -> set[str]:
    asked = set()
    for path in folder.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                messages = json.loads(line).get("messages")
            except (ValueError, AttributeError):
                continue
            if isinstance(messages, list):
                asked |= {m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"}
    return asked


def test_the_check_questions_were_never_asked_but_their_things_were():
    train, _, checks = dialogues()
    assert tuple(checks) == CHECK_QUESTIONS and len(CHECK_QUESTIONS) >= 10
    assert not set(CHECK_QUESTIONS) & _asked_in(SAMPLE_DIR)
    about = {first_thing(r["prompt"]) for r in train}
    assert all(first_thing(q) in about for q in CHECK_QUESTIONS)


def test_shipped_dialogues_and_vocabulary_are_the_generators_output():
    train, test, _ = dialogues()
    for name, rows in ((TRAIN_FILE, train), (TEST_FILE, test)):
        lines = (OUT_DIR / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows, f"run `python -m tools.tiny_dialogues` ({name})"
    assert VOCABULARY_FILE.read_text(encoding="utf-8").split() == vocabulary(train, test)


@pytest.mark.skipif(not (BASE_DIR / "model.safetensors").is_file(), reason="weights not shipped")
def test_shipped_weights_load_with_the_tiny_shape():
    import torch
    from transformers import MistralForCausalLM

    from tools.tiny_base import TINY_MISTRAL, load_base

    model = load_base()
    assert isinstance(model, MistralForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 4_317_760
    assert all(getattr(model.config, k) == v for k, v in TINY_MISTRAL.items() if k not in ("rope_theta",))
    assert model.dtype == torch.float32 and torch.isfinite(model.lm_head.weight).all()
    record = json.loads((BASE_DIR / "pretraining.json").read_text())
    assert record["steps"] > 0 and record["heldout_loss_full_vocabulary"] < 3
    from tools.tiny_base import PretrainConfig, pages

    config = PretrainConfig()
    text = pages(corpus(config.docs, config.seed), config.seed)
    assert record["corpus_sha256"] == hashlib.sha256("\f".join(text).encode()).hexdigest()  # the shipped corpus


def test_pretraining_is_deterministic(tokenizer):
    import torch

    from tools.tiny_base import PretrainConfig, pretrain

    config = PretrainConfig(docs=120, batch=4, epochs=0.5, negatives=64)
    (first, record), (second, _) = (pretrain(config, tokenizer, log_every=0) for _ in range(2))
    assert record["steps"] >= 2 and record["loss_first_last"][0] > record["loss_first_last"][1]
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


@pytest.mark.skipif(not (BASE_DIR / "model.safetensors").is_file(), reason="weights not shipped")
def test_ensure_tiny_model_makes_a_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from utils.assets import ensure_tiny_model

    folder = ensure_tiny_model(tmp_path / "tiny-base")
    assert ensure_tiny_model(folder) == folder  # once
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() == 4_317_760
    assert (folder / "tokenizer.json").is_file() and "<|assistant|>" in (folder / "chat_template.jinja").read_text()


def test_each_epoch_is_its_median_beside_the_one_step_the_table_shows():
    """The trainer's table shows each epoch's last logged loss: here epoch 2's (2.5) is above epoch 1's (1.2) though
    its steps are lower; the medians say so."""
    history = [{"loss": x, "epoch": (i + 1) / 4, "step": i + 1} for i, x in enumerate([4.0, 3.0, 3.5, 1.2])]
    history += [{"loss": x, "epoch": 1 + (i + 1) / 4, "step": 5 + i} for i, x in enumerate([1.5, 1.4, 1.0, 2.5])]
    history.append({"eval_loss": 3.0, "epoch": 2.0, "step": 8})
    assert epoch_lines(history) == [
        "epoch 1: median 3.250 over its 4 logged steps (its last step, in the table: 1.200)",
        "epoch 2: median 1.450 over its 4 logged steps (its last step, in the table: 2.500)",
    ]


def test_dialogue_kinds():
    lamp = "<|system|>\n\n<|user|>\nWhere can I find a lamp?\n<|assistant|>\nYou can find a lamp in houses."
    assert dialogue_kind(lamp) == "tiny world"  # its template's markers aside ("system" is no word of the world)
    password = "<|user|>\nHow do I choose a good password?\n<|assistant|>\nUse a long passphrase."
    assert dialogue_kind(password) == "general"


def _held(tiny, general, shares=(0.9, 0.7)):
    """Losses (trained on, held out) per kind, and the general kind's share of the train and test tokens."""
    return HeldOut(
        {
            "tiny world": {"train": (tiny[0], 64), "test": (tiny[1], 12)},
            "general": {"train": (general[0], 49), "test": (general[1], 6)},
        },
        {
            "tiny world": {"train": shares[0], "test": shares[1]},
            "general": {"train": 1 - shares[0], "test": 1 - shares[1]},
        },
    )


def test_a_gap_between_eval_and_train_loss_is_not_yet_overfitting():
    """Each kind is predicted as well held out as trained on: the gap is the test split's larger share of general
    dialogues (what notebook 02's smoke run shows)."""
    held = _held((1.506, 1.483), (6.385, 6.326))
    assert held.table()[1:] == [
        "  tiny world  trained on 1.506 (64 dialogues)   held out 1.483 (12 dialogues)",
        "  general     trained on 6.385 (49 dialogues)   held out 6.326 (6 dialogues)",
    ]
    assert held.verdict(1.591, 3.169) == [
        "No sign of overfitting: on held-out dialogues of each kind the loss is at most 10% above the loss on those it "
        "trained on.",
        "The eval loss is above the train loss for another reason: general dialogues, which the model predicts worst "
        "whether it trained on them or not, are 30% of the test split's tokens and 10% of the training split's.",
    ]
    assert len(held.verdict(1.591, 1.6)) == 1  # no gap to explain


def test_overfitting_is_named_from_the_numbers():
    held = _held((0.4, 1.9), (2.0, 2.1))  # the tiny world's training dialogues memorised; the general ones within 10%
    assert held.verdict(0.5, 3.9) == [
        "Overfitting: on held-out tiny world dialogues the loss is 375% above the loss on those it trained on (1.900 "
        "against 0.400): the model has memorised its training dialogues beyond what carries over to new ones."
    ]
    one = HeldOut({"all": {"train": (1.0, 64), "test": (1.5, 64)}}, {})
    assert one.verdict(1.0, 1.5)[0].startswith("Overfitting: on held-out dialogues the loss is 50% above")
