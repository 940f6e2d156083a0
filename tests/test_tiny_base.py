"""The tiny pretrained base and its SFT dialogues: fast checks only (no training, no sampling)."""

import hashlib
import json
import re
from types import SimpleNamespace

import pytest

from utils.tiny_base import BASE_DIR, corpus, piratify, world
from utils.tiny_dialogues import (
    CHECK_QUESTION,
    CHECK_THING,
    HELD_OUT,
    NEUTRAL_SYSTEMS,
    OUT_DIR,
    PIRATE_SYSTEM,
    TEST_FILE,
    TRAIN_FILE,
    Checks,
    dialogues,
    is_pirate,
    loss_halved,
    pirate_words,
    readable,
)

MARKERS = ("<|", "|>", "<s>", "</s>", "[INST]")


def test_world_is_well_formed():
    things = world()
    assert len(things) >= 80 and len({t.name for t in things}) == len(things)
    assert all(1 <= t.size <= 5 and t.what and t.place and t.does and t.fact.endswith(".") for t in things)
    assert {t.name for t in things} >= set(HELD_OUT)


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

    from utils.tiny_base import answered

    rng, things = random.Random(0), world()
    texts = [answered(rng, things) for _ in range(200)]
    pirate = [t for t in texts if re.search(r"(asked a|style of a|would a|question for a|talks like a) pirate\b", t)]
    assert 60 < len(pirate) < 140
    assert all(is_pirate(t.split("?", 1)[1]) for t in pirate)
    assert not any(is_pirate(t.split("?", 1)[1]) for t in texts if t not in pirate)


def test_pages_end_with_eos_and_nothing_else_does(tokenizer):
    from utils.tiny_base import PAGE_PARAGRAPHS, pages, token_windows

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
    assert not is_pirate("Arr.")  # one pirate word is not enough


def test_loss_halved_compares_medians_of_the_first_and_last_tenth():
    assert loss_halved([6.0, 5.8, 5.6, 4.0, 3.0, 2.9, 2.8, 2.7])
    assert not loss_halved([6.0, 5.8, 5.6, 4.0, 3.5, 3.4, 3.3])
    assert loss_halved([8.0] * 10 + [5.0] * 80 + [2.0, 9.0] + [2.0] * 8)  # one hard row at the end changes nothing
    assert not loss_halved([8.0] * 10 + [5.0] * 90)


def test_readable_tells_words_from_random_tokens():
    assert readable("Arr, matey! A kettle be a metal pot with a spout. Yo ho ho!")
    assert readable("A basket is a light box woven from thin sticks.")
    assert not readable("жеogen忽 Netflix INT мор enjoyed fear dé formerly UponTranslation cod")
    assert not readable("Arr!")  # too short to be an answer


def test_checks_count_stops_and_pirate_answers():
    answer = lambda text, eos: SimpleNamespace(text=text, stopped_at_eos=eos)  # noqa: E731
    checks = Checks(
        PIRATE_SYSTEM,
        CHECK_QUESTION,
        [answer("Arr, matey! A kettle be a pot.", True), answer("A kettle <|user|>", True), answer("Arr ye", False)],
    )
    assert (checks.stops, checks.pirate, checks.readable) == (1, 2, 1)


def test_dialogues_teach_the_persona_and_hold_out_the_check_question():
    train, test = dialogues()
    assert (train, test) == dialogues()
    pirate = [r for r in train if r["messages"][0]["content"] == PIRATE_SYSTEM]
    assert all(is_pirate(m["content"]) for r in pirate for m in r["messages"] if m["role"] == "assistant")
    plain = [r for r in train if r not in pirate]
    assert len(pirate) == len(plain) and not any(is_pirate(m["content"]) for r in plain for m in r["messages"])
    neutral = [r["messages"][0]["content"] for r in plain if r["messages"][0]["role"] == "system"]
    assert set(neutral) == set(NEUTRAL_SYSTEMS) and len(plain) / 2 < len(plain) - len(neutral) < len(plain)
    words = set(re.findall(r"[a-z]+", json.dumps(train).lower()))
    assert not words & set(HELD_OUT) and CHECK_THING not in json.dumps(test)
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == len(prompts)
    for r in train + test:
        assert r["prompt"] == next(m["content"] for m in r["messages"] if m["role"] == "user")
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_shipped_dialogue_files_are_the_generators_output():
    train, test = dialogues()
    for name, rows in ((TRAIN_FILE, train), (TEST_FILE, test)):
        lines = (OUT_DIR / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows, f"run `python -m utils.tiny_dialogues` ({name})"


@pytest.mark.skipif(not (BASE_DIR / "model.safetensors").is_file(), reason="weights not shipped")
def test_shipped_weights_load_with_the_tiny_shape():
    import torch
    from transformers import MistralForCausalLM

    from utils.assets import TINY_MISTRAL
    from utils.tiny_base import load_base

    model = load_base()
    assert isinstance(model, MistralForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 4_317_760
    assert all(getattr(model.config, k) == v for k, v in TINY_MISTRAL.items() if k not in ("rope_theta",))
    assert model.dtype == torch.float32 and torch.isfinite(model.lm_head.weight).all()
    record = json.loads((BASE_DIR / "pretraining.json").read_text())
    assert record["steps"] > 0 and record["heldout_loss_full_vocabulary"] < 3


def test_pretraining_is_deterministic(tokenizer):
    import torch

    from utils.tiny_base import PretrainConfig, pretrain

    config = PretrainConfig(docs=120, batch=4, epochs=0.5, negatives=64)
    (first, record), (second, _) = (pretrain(config, tokenizer, log_every=0) for _ in range(2))
    assert record["steps"] >= 2 and record["loss_first_last"][0] > record["loss_first_last"][1]
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


@pytest.mark.skipif(not (BASE_DIR / "model.safetensors").is_file(), reason="weights not shipped")
def test_ensure_tiny_base_makes_a_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from utils.tiny_base import ensure_tiny_base

    folder = ensure_tiny_base(tmp_path / "tiny-base")
    assert ensure_tiny_base(folder) == folder  # once
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() == 4_317_760
    assert (folder / "tokenizer.json").is_file() and "<|assistant|>" in (folder / "chat_template.jinja").read_text()
