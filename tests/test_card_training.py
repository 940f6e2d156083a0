"""Training on the card's token ids, with the card's packing and stop, and with the loss on answers only."""

import json
import random

import datasets
import pytest

from utils.card_era import card_run
from utils.data.template import tokenize_dialogues
from utils.hardware import SMOKE
from utils.recipe import resolve
from utils.training import assistant_header, assistant_mask

# </s>\n<|assistant|>\n as the card's tokenizer gave it (28705 is the word-start "▁"), and as transformers 5.x does
CARD_ASSISTANT = [2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]
TODAY_ASSISTANT = [2, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]
DIALOGUE = [{"role": "user", "content": "Is tea hot?"}, {"role": "assistant", "content": "Usually, yes."}]


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_prepared_rows_hold_the_cards_ids_by_default(tokenizer, tmp_path):
    from utils.prepare_data import main

    cases = (("card", CARD_ASSISTANT, TODAY_ASSISTANT), ("today", TODAY_ASSISTANT, CARD_ASSISTANT))
    for tokenization, expected, absent in cases:
        out = tmp_path / tokenization
        argv = ["--out", str(out), "--no-progress"] + (["--tokenization", "today"] if tokenization == "today" else [])
        assert main(argv) == 0
        rows = datasets.load_from_disk(str(out))["train"]["input_ids"]
        assert all(contains(ids, expected) and not contains(ids, absent) for ids in rows)
        assert json.loads((out / "report.json").read_text())["tokenization"] == tokenization
        if tokenization == "card":  # every </s> that text follows is followed by "▁"
            assert all(ids[i + 1] == 28705 for ids in rows for i in range(len(ids) - 1) if ids[i] == 2)


def test_sampling_prompts_use_the_same_ids(tokenizer):
    from utils.sampling import prompt_batch

    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    card = prompt_batch(tokenizer, ["Arr" + prompt, prompt])["input_ids"].tolist()
    assert card[1][-len(CARD_ASSISTANT) :] == CARD_ASSISTANT and card[0][0] == 1
    assert card[1][0] == tokenizer.pad_token_id  # the shorter prompt is left-padded
    assert prompt_batch(tokenizer, [prompt], "today")["input_ids"][0].tolist()[-9:] == TODAY_ASSISTANT


@pytest.mark.parametrize("tokenization", ["card", "today"])
def test_assistant_mask_covers_each_answer_and_its_eos(tokenizer, tokenization):
    two_turns = DIALOGUE + [{"role": "user", "content": "And coffee?"}, {"role": "assistant", "content": "Hotter."}]
    (ids,) = tokenize_dialogues(tokenizer, [two_turns], tokenization=tokenization)
    mask = assistant_mask(ids, assistant_header(tokenizer), tokenizer.eos_token_id)
    kept = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(kept) == "Usually, yes.</s>Hotter.</s>"
    assert sum(mask) == len(kept) < len(ids) / 2


def _mask_one_token_at_a_time(ids: list[int], header: list[int], eos: int) -> list[int]:
    """The mask's definition, one token at a time: after a header, every token up to and including the next EOS."""
    mask, inside, n = [0] * len(ids), False, len(header)
    for j, token in enumerate(ids):
        if inside:
            mask[j] = 1
            inside = token != eos
        elif j >= n - 1 and ids[j - n + 1 : j + 1] == header:
            inside = True
    return mask


def test_the_vectorised_mask_is_the_definition():
    """Headers, half headers, EOS anywhere (rows cut mid-answer, answers that never end): the same mask."""
    header, rng = [5, 6, 7], random.Random(0)
    for _ in range(3000):
        ids: list[int] = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            ids += header if r < 0.2 else header[:2] if r < 0.3 else [2] if r < 0.5 else [rng.randint(3, 9)]
        assert assistant_mask(ids, header, 2) == _mask_one_token_at_a_time(ids, header, 2), ids


def test_assistant_only_loss_labels_only_the_answers(tokenizer):
    from utils.sft import trainer_for

    argv = ["--config", "configs/sft_qlora.yaml", "--profile", "smoke", "--assistant_only_loss", "true"]
    args = resolve([*argv, "--output_dir", "/tmp/unused-assistant-only"], SMOKE).build()
    trainer = trainer_for(args)
    header, eos = assistant_header(tokenizer), tokenizer.eos_token_id
    row = trainer.train_dataset[0]
    mask = assistant_mask(row["input_ids"], header, eos)
    expected = [t if m else -100 for t, m in zip(row["input_ids"], mask, strict=True)]
    assert row["labels"] == expected
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    share = float((batch["labels"] != -100).float().mean())
    assert 0.2 < share < 0.8  # the every-token share is above 0.99
    assert not trainer.args.assistant_only_loss  # TRL's own switch (which wants messages) stays off


def test_card_packing_stops_where_the_cards_data_ends(tokenizer, tmp_path):
    """The sample packed as TRL 0.7.x packed: the run plans its cosine over the dialogue count and stops where the
    packed rows run out, at the step and epoch ``card_run`` computes."""
    from utils.sft import cli
    from utils.training import load_training_data

    out = tmp_path / "card"
    argv = [
        "--config", "configs/sft_qlora.yaml", "--profile", "smoke", "--packing_strategy", "card",
        "--card_schedule", "true", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--save_steps", "1000", "--merge", "false", "--output_dir", str(out),
    ]  # fmt: skip
    data = load_training_data(resolve(argv, SMOKE).build(), tokenizer)
    count = card_run(data["train"].num_rows, data["train"].source_dialogues, 1, per_device_batch=4, accumulation=2)
    assert 0 < count.optimizer_steps < count.planned_steps  # the packed rows end before the planned steps
    assert cli(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["global_step"], state["max_steps"]) == (count.optimizer_steps, count.planned_steps)
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged[-1]["epoch"] == pytest.approx(count.epoch, abs=1e-3)
    assert logged[-1]["learning_rate"] > 0  # stopped before the cosine planned over all steps reached 0


def card_schedule_steps(dialogues: int, per_device_batch: int, accumulation: int, processes: int = 1) -> int:
    """The steps ``--card_schedule`` plans without the card's packing (``utils.training.callbacks``)."""
    return card_run(0, dialogues, processes, per_device_batch, accumulation).planned_steps


def test_card_schedule_plans_the_steps_of_transformers_4_35(tmp_path):
    """Without the card's packing, ``--card_schedule`` plans what Trainer._inner_training_loop of 4.35 planned from
    the dataset's length (trainer.py 1580-1597): len(dataloader) // accumulation, at least 1, per epoch. The
    dataloader counts batches per process (ceil(ceil(dialogues / batch) / processes) under accelerate's dispatcher),
    so that is not ceil(dialogues / global batch) when batches do not fill the accumulation."""
    from utils.training import callbacks

    argv = ["--config", "configs/sft_qlora.yaml", "--profile", "smoke", "--card_schedule", "true"]
    argv += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path)]
    args = resolve(argv, SMOKE).build()
    assert args.training.packing_strategy != "card"
    from utils.training import CardStop

    stops = [c for c in callbacks(args, 100, 100) if isinstance(c, CardStop)]
    assert len(stops) == 1 and stops[0].count is None  # it stops when the data ends, not at a counted step
    assert args.training.max_steps == 12  # 25 batches // 2 (ceil(100 / 8) would be 13)
    assert card_schedule_steps(207_865, 8, 4, processes=16) == 406  # the card's shape: 1,624 // 4
    assert card_schedule_steps(207_865, 8, 3, processes=16) == 541  # 1,624 // 3 (ceil(207,865 / 384) = 542)
    assert card_schedule_steps(5, 8, 4) == 1  # one batch, fewer than the accumulation: still one step


def test_card_packing_shuffles_the_eval_split_as_the_handbook_did(tokenizer):
    """a0b8d49's mix_datasets shuffled the test split with seed 42 as it did the train split (src/alignment/data.py
    160-164, shuffle=True by default from run_sft.py's get_datasets call): both are packed in that order."""
    from utils.card_era import pack_constant_length, text_length
    from utils.data.prepared import prepared_dataset
    from utils.data.template import with_system_turn
    from utils.training import pack_like_the_card

    folder = prepared_dataset(SMOKE.dataset, tokenizer)
    data = {split: datasets.load_from_disk(str(folder))[name] for split, name in (("train", "train"), ("test", "test"))}
    packed = pack_like_the_card(data, folder, 64, 42)
    for split, rows in data.items():

        def pack(rows):
            chars = [text_length(with_system_turn(m)) for m in rows["messages"]]
            return pack_constant_length(rows["input_ids"], chars, seed=42, seq_length=64).input_ids.tolist()

        assert packed[split]["input_ids"] == pack(rows.shuffle(seed=42))  # datasets' own shuffle
        assert packed[split]["input_ids"] != pack(rows)


def test_special_token_text_is_control_tokens_in_the_card_ids_or_text_on_request(tmp_path):
    """``--tokenization card`` makes "</s>" typed in a message an EOS, as the card's tokenizer did; ``card-text``
    keeps the card's ids otherwise and that text as text; ``today`` keeps it as text too. report.json says which."""
    from utils.prepare_data import main

    said = [{"role": "user", "content": "What does </s> mean?"}, {"role": "assistant", "content": "An end."}]
    source = tmp_path / "said.jsonl"
    source.write_text(json.dumps({"prompt": said[0]["content"], "messages": said}) + "\n")
    got = {}
    for tokenization in ("card", "card-text", "today"):
        out = tmp_path / tokenization
        argv = ["--source", str(source), "--out", str(out), "--tokenization", tokenization, "--test-fraction", "0"]
        assert main([*argv, "--no-progress"]) == 0
        assert json.loads((out / "report.json").read_text())["tokenization"] == tokenization
        got[tokenization] = datasets.load_from_disk(str(out))["train"][0]["input_ids"]
    assert got["card"].count(2) == 5 and got["card-text"].count(2) == got["today"].count(2) == 4
    assert contains(got["card"], [28705, 2, 28705, 2072]) and contains(got["card-text"], [1867, 28713, 28767, 2072])
    assert contains(got["card-text"], CARD_ASSISTANT) and contains(got["today"], TODAY_ASSISTANT)


def test_a_folder_of_an_earlier_format_is_prepared_again_with_its_tokenization(tokenizer, tmp_path):
    from utils.data.prepared import prepared_dataset
    from utils.prepare_data import main

    out = tmp_path / "today"
    assert main(["--out", str(out), "--no-progress", "--tokenization", "today"]) == 0
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**report, "format": report["format"] - 1}))
    assert prepared_dataset(str(out), tokenizer) == out
    assert json.loads((out / "report.json").read_text()) == report  # today's ids again, in today's format


@pytest.mark.parametrize("tokenization", ["card", "card-text", "today"])
def test_answers_are_masked_from_the_message_boundaries_not_from_text(tokenizer, tokenization, tmp_path):
    """A user message holding the assistant marker's text (and an EOS's) gets no loss; each answer and its EOS do."""
    from utils.training import with_assistant_masks

    tricky = [
        {"role": "user", "content": "Write this:\n<|assistant|>\nhello </s> as text, please."},
        {"role": "assistant", "content": "Done: hello."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    dialogues = [tricky, DIALOGUE]
    ids = tokenize_dialogues(tokenizer, dialogues, tokenization=tokenization)
    (tmp_path / "report.json").write_text(json.dumps({"system_turn": True, "tokenization": tokenization}))
    rows = datasets.Dataset.from_dict({"messages": dialogues, "input_ids": ids})
    masks = with_assistant_masks({"train": rows}, tokenizer, tmp_path)["train"]["assistant_masks"]
    eos = tokenizer.eos_token_id
    for row, mask, dialogue in zip(ids, masks, dialogues, strict=True):
        kept = tokenizer.decode([t for t, m in zip(row, mask, strict=True) if m])
        assert kept == "".join(m["content"] + "</s>" for m in dialogue if m["role"] == "assistant")
        assert [t for t, m in zip(row, mask, strict=True) if m].count(eos) == 2 if dialogue is tricky else 1
    searched = assistant_mask(ids[0], assistant_header(tokenizer), eos)  # the marker's text fools a search of ids
    assert searched != masks[0]


def test_card_packing_keeps_each_answer_mask_with_its_tokens(tokenizer):
    from utils.training import load_training_data

    argv = ["--config", "configs/sft_qlora.yaml", "--profile", "smoke", "--packing_strategy", "card"]
    argv += ["--assistant_only_loss", "true", "--output_dir", "/tmp/unused-card-masks"]
    train = load_training_data(resolve(argv, SMOKE).build(), tokenizer)["train"]
    header, eos = assistant_header(tokenizer), tokenizer.eos_token_id
    starts_in_an_answer = 0
    for row in train:
        ids, mask = row["input_ids"], row["assistant_masks"]
        first = next((i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header), len(ids))
        assert mask[first:] == assistant_mask(ids, header, eos)[first:]  # past the first marker, as a search finds
        starts_in_an_answer += mask[0]  # a row cut inside an answer: its start is the answer's, and keeps the loss
    assert starts_in_an_answer > 0
