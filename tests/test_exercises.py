"""The check cells under "Try this": right, wrong and not-tried runs each get their mark (made-up run folders)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from utils import exercises


def _run(folder, adapter_rows: int | None = None, r: int = 16, lrs=(), rows: int | None = None, losses=(), **settings):
    """A finished run folder as utils.sft leaves it, with only what the checks read."""
    folder.mkdir(parents=True)
    record = {"tool": "utils.sft", "settings": settings, "status": "finished"}
    (folder / "run.json").write_text(json.dumps(record))
    history = [{"step": i + 1, "learning_rate": lr, "loss": 1.0} for i, lr in enumerate(lrs)]
    history += [{"step": i + 1, "learning_rate": 0.005, "loss": loss} for i, loss in enumerate(losses)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (folder / "speed.json").write_text(json.dumps({"packed_rows": rows}))
    if adapter_rows:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": r}))
        save_file({"a": torch.zeros(adapter_rows, 8)}, str(folder / "adapter" / "adapter_model.safetensors"))
    return folder


EVERY_TOKEN = [4.0] * 4 + [2.0] * 32 + [1.6, 1.5, 1.4, 9.0]  # 40 steps: the median of the last 4 is 1.55
ANSWERS_ONLY = [0.9] * 4 + [0.3] * 32 + [0.2, 0.1, 6.0, 0.15]  # 0.175


def test_notebook_02_marks_each_run(tmp_path):
    main = _run(tmp_path / "qlora", adapter_rows=16, rows=77, losses=EVERY_TOKEN)
    assert [line[0] for line in exercises.notebook_02(tmp_path, main)] == ["·"] * 5  # nothing tried
    _run(tmp_path / "qlora-r64", adapter_rows=64, r=64)
    _run(tmp_path / "qlora-split", rows=78)
    _run(tmp_path / "qlora-10", lrs=[0.0, 0.01, 0.01, 0.005])  # the first step at the peak counts
    _run(tmp_path / "qlora-answers", losses=ANSWERS_ONLY, assistant_only_loss=True)
    lines = exercises.notebook_02(tmp_path, main)
    assert lines[0] == "✓ rank 64: r = 64, 512 adapter parameters, 4.0x rank 16's 128"
    assert lines[1] == "✓ bfd_split: 78 packed rows, against 77 with bfd"
    assert lines[2] == "✓ ten steps: the learning rate is 0 at step 1 and peaks at step 2 (0.01)"
    assert lines[3] == (
        "✓ answers only: its training loss ends at 0.175 (median of the last tenth of the steps), against 1.550 with "
        "the loss on every token"
    )
    assert lines[4].startswith("· a second run: last written: qlora-r64 ")


def test_notebook_02_answers_only_needs_the_option_and_enough_steps(tmp_path):
    main = _run(tmp_path / "qlora", adapter_rows=16, rows=77, losses=EVERY_TOKEN)
    _run(tmp_path / "qlora-answers", losses=EVERY_TOKEN)  # trained on every token
    assert exercises.notebook_02(tmp_path, main)[3] == (
        "✗ answers only: runs/qlora-answers was trained on every token: run the command as written"
    )
    shutil.rmtree(tmp_path / "qlora-answers")
    _run(tmp_path / "qlora-answers", losses=[0.5] * 10, assistant_only_loss=True)
    assert exercises.notebook_02(tmp_path, main)[3] == (
        "· answers only: too few logged steps for the median of a last tenth: run the command as written"
    )
    shutil.rmtree(tmp_path / "qlora")
    shutil.rmtree(tmp_path / "qlora-answers")
    _run(tmp_path / "qlora-answers", losses=ANSWERS_ONLY, assistant_only_loss=True)
    assert exercises.notebook_02(tmp_path, tmp_path / "qlora")[3] == (
        "· answers only: its training loss ends at 0.175 (median of the last tenth of the steps); run the "
        "notebook's own run to compare"
    )


def test_notebook_02_says_what_a_run_showed_instead(tmp_path):
    main = _run(tmp_path / "qlora", adapter_rows=16, rows=77, losses=EVERY_TOKEN)
    _run(tmp_path / "qlora-r64", adapter_rows=32, r=32)
    _run(tmp_path / "qlora-split", rows=77)
    _run(tmp_path / "qlora-10", lrs=[0.001, 0.005, 0.01, 0.002])
    _run(tmp_path / "qlora-answers", losses=[x + 2 for x in ANSWERS_ONLY], assistant_only_loss=True)
    lines = exercises.notebook_02(tmp_path, main)
    assert [line[0] for line in lines[:3]] == ["✗"] * 3 and lines[3].startswith("✗ answers only: ")
    assert "peaks at step 3" in lines[2]


def test_notebook_03_compares_predictions_and_reads_each_ranks_losses(tmp_path):
    lines = exercises.notebook_03({"accumulation, 16 GPUs x 4": 8, "accumulation, 4 GPUs x 2": 32}, tmp_path)
    assert lines[0] == "✓ accumulation, 16 GPUs x 4: you said 8, it is 8 (4 x 16 x 8 = 512)"
    assert lines[1] == "✗ accumulation, 4 GPUs x 2: you said 32, it is 64 (2 x 4 x 64 = 512)"
    assert lines[2] == "· 1 sequence per device: not run yet (runs/full-bs1)"
    assert lines[3] == "· fsdp or zero3: no prediction yet"  # the answer is not given away
    run = _run(tmp_path / "full-bs1")
    (run / "rank_logs").mkdir()
    for rank, own in enumerate(([2.0, 1.0], [4.0, 1.0])):
        record = {"losses": [3.0, 1.0], "own_losses": own}
        (run / "rank_logs" / f"rank{rank}.json").write_text(json.dumps(record))
    assert exercises.notebook_03({}, tmp_path)[2] == (
        "✓ 1 sequence per device: own losses differ at 1 of 2 steps; the logged loss is their mean at every step, "
        "on both ranks"
    )


def test_notebook_05_reads_the_logged_answers():
    cold = [
        {"model": "qlora", "prompt": None, "temperature": 0.01, "seed": s, "text": "A kettle boils."} for s in (1, 2)
    ]
    plain = [{"model": "qlora", "prompt": "What is a kettle?", "system": None, "text": "Arr, matey! It be hot."}]
    hot = [{"model": "qlora", "prompt": None, "temperature": 1.5, "seed": 1, "text": "Kettle zork flimble."}]
    lines = exercises.notebook_05(cold + plain + hot)
    assert lines[0] == "✓ almost greedy: 1 of 1 models gave the same answer for every seed"
    assert lines[1] == "✗ without the system message: 1 of 1 fine-tuned answers talk like a pirate"
    assert lines[2].startswith("✓ hot sampling: 33% of the words at 1.5 are the tiny world's, 100% at 0.01")
    cold[1]["text"] = "A kettle whistles."
    assert exercises.notebook_05(cold)[0] == "✗ almost greedy: 0 of 1 models gave the same answer for every seed"
    assert [line[0] for line in exercises.notebook_05([])] == ["·"] * 3


def test_the_answer_log_skips_damaged_lines(tmp_path):
    from utils.sampling import Answer, log_answer, logged_answers

    log = tmp_path / "sampling" / "answers.jsonl"
    log_answer(Answer("p", "Arr!", 2, True), "qlora", {"seed": 1, "temperature": 0.7}, log)
    with log.open("a") as f:
        f.write('{"model": "qlora", "te\n[1, 2]\n{"text": "no model"}\n')
    log_answer(Answer("p", "Ahoy!", 3, False), "base", {"seed": 2}, log)
    rows = logged_answers(log)
    assert [(r["model"], r["text"], r["seed"]) for r in rows] == [("qlora", "Arr!", 1), ("base", "Ahoy!", 2)]
    assert logged_answers(tmp_path / "nothing.jsonl") == []


# --- damaged or missing files: the check marks the item it cannot read and still gives the others ----------------
def _good_02(tmp_path):
    main = _run(tmp_path / "qlora", adapter_rows=16, rows=77)
    _run(tmp_path / "qlora-r64", adapter_rows=64, r=64)
    _run(tmp_path / "qlora-split", rows=78)
    _run(tmp_path / "qlora-10", lrs=[0.0, 0.01, 0.01, 0.005])
    return main


def _no_learning_rate(runs):
    _write_state(runs / "qlora-10", [{"step": 1, "loss": 1.0, "learning_rate": None}, {"step": 2, "loss": 0.9}])
    return 2, f"· ten steps: cannot read {runs / 'qlora-10' / 'trainer_state.json'}: it logged no learning rate"


def _no_trainer_state(runs):
    (runs / "qlora-10" / "trainer_state.json").unlink()
    return 2, f"· ten steps: cannot read {runs / 'qlora-10' / 'trainer_state.json'}: there is no such file"


def _no_adapter(runs):
    shutil.rmtree(runs / "qlora-r64" / "adapter")
    weights = runs / "qlora-r64" / "adapter" / "adapter_model.safetensors"
    return 0, f"· rank 64: cannot read {weights}: there is no such file"


def _no_speed_report(runs):
    (runs / "qlora-split" / "speed.json").unlink()
    return 1, f"· bfd_split: cannot read {runs / 'qlora-split' / 'speed.json'}: there is no such file"


def _write_state(folder, history):
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))


@pytest.mark.parametrize("damage", [_no_learning_rate, _no_trainer_state, _no_adapter, _no_speed_report])
def test_notebook_02_marks_what_it_cannot_read(tmp_path, damage):
    main = _good_02(tmp_path)
    good = exercises.notebook_02(tmp_path, main)
    index, said = damage(tmp_path)
    lines = exercises.notebook_02(tmp_path, main)
    assert lines[index] == said
    assert lines[:index] + lines[index + 1 : 3] == good[:index] + good[index + 1 : 3]  # the other items
    assert lines[-1].startswith("· a second run: last written: qlora-r64 ")


def test_notebook_03_marks_a_rank_log_without_own_losses(tmp_path):
    run = _run(tmp_path / "full-bs1")
    (run / "rank_logs").mkdir()
    for rank in (0, 1):
        (run / "rank_logs" / f"rank{rank}.json").write_text(json.dumps({"losses": [3.0, 1.0]}))
    lines = exercises.notebook_03({"accumulation, 16 GPUs x 4": 8}, tmp_path)
    assert lines == [
        "✓ accumulation, 16 GPUs x 4: you said 8, it is 8 (4 x 16 x 8 = 512)",
        "· accumulation, 4 GPUs x 2: no prediction yet",
        f"· 1 sequence per device: cannot read {run / 'rank_logs' / 'rank0.json'}: it has no own_losses",
        "· fsdp or zero3: no prediction yet",
    ]


def _answers() -> list[dict]:
    cold = [
        {"model": "qlora", "prompt": None, "temperature": 0.01, "seed": s, "text": "A kettle boils."} for s in (1, 2)
    ]
    hot = [{"model": "qlora", "prompt": None, "temperature": 1.5, "seed": 1, "text": "Kettle zork flimble."}]
    return cold + hot


@pytest.mark.parametrize("temperature", [None, "hot"])
def test_notebook_05_leaves_out_answers_without_a_number_for_temperature(temperature):
    odd = {"model": "qlora", "prompt": None, "temperature": temperature, "seed": 3, "text": "A kettle sings."}
    assert exercises.notebook_05([*_answers(), odd]) == [
        "✓ almost greedy: 1 of 1 models gave the same answer for every seed",
        "· without the system message: run the command with --prompt",
        "✓ hot sampling: 33% of the words at 1.5 are the tiny world's, 100% at 0.01",
        f"· answer log: 1 answer logged with temperature {temperature!r}, not a number: left out of almost greedy "
        "and hot sampling",
    ]


def test_notebook_05_reads_a_log_cut_inside_a_character(tmp_path):
    from utils.sampling import logged_answers

    log = tmp_path / "answers.jsonl"
    whole = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in _answers()[:2]).encode()
    hot = json.dumps({**_answers()[2], "text": "Kettle ☠ flimble."}, ensure_ascii=False).encode()
    log.write_bytes(whole + hot[: hot.index("☠".encode()) + 1])  # the write stopped inside the skull's 3 bytes
    assert exercises.notebook_05(logged_answers(log)) == [
        "✓ almost greedy: 1 of 1 models gave the same answer for every seed",
        "· without the system message: run the command with --prompt",
        "· hot sampling: run the temperature 1.5 command (and the 0.01 ones to compare)",
    ]


SAMPLE = "data/sample/ultrachat_200k"


def _prepared(out, train_tokens: int = 1000):
    """A prepared folder as notebook 01 leaves it, with only what its check reads: two train dialogues, one with a
    system prompt of its own."""
    import datasets

    user = {"role": "user", "content": "Hi"}
    messages = [[{"role": "system", "content": "Be brief."}, user], [{"role": "system", "content": ""}, user]]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": messages})}).save_to_disk(str(out))
    report = {
        "dropped": {"structure": 11, "disclaimer": 3, "duplicate_prompt": 2},
        "kept": 583,
        "tokenization": "card",
        "outputs": {"train": {"total_tokens": train_tokens}, "test": {"dialogues": 0}},
    }
    (out / "report.json").write_text(json.dumps(report))
    return out


FILTERS_NOT_TRIED = (
    "· FILTERS = \"all\": not tried (this run: FILTERS = 'auto', 16 rows dropped: 11 for their structure, "
    "3 disclaimers, 2 duplicate prompts)"
)
RAW_NOT_TRIED = (
    '· SOURCE = "data/sample/ultrachat_raw/ultrachat_raw.jsonl": not tried (this run read ultrachat_200k, which has '
    "its own test split)"
)


def test_notebook_01_compares_a_run_with_an_earlier_one(tmp_path):
    out, history = _prepared(tmp_path / "processed"), tmp_path / "exercises"
    lines = exercises.notebook_01(out, "auto", True, SAMPLE, history)
    assert lines == [
        FILTERS_NOT_TRIED,
        "· SYSTEM_TURN = False: not tried (this run's train split: 1,000 tokens)",
        RAW_NOT_TRIED,
    ]
    (out / "report.json").write_text((out / "report.json").read_text().replace("1000", "991"))
    assert exercises.notebook_01(out, "auto", False, SAMPLE, history)[1] == (
        "✓ SYSTEM_TURN = False: 9 tokens fewer (1,000 -> 991) over the 1 dialogues without a system prompt of their "
        "own: 9.0 each"
    )
    assert len(json.loads((history / "01.json").read_text())["runs"]) == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"runs": [', "it is not JSON (Expecting value at line 1)"),
        ("[1, 2]", "it holds a list, not a JSON object"),
        ("3", "it holds a number, not a JSON object"),
        ('{"runs": "all"}', "its runs is a string, not a list"),
        ('{"runs": [{"system_turn": true}, 7]}', "its runs are not all JSON objects"),
    ],
)
def test_notebook_01_leaves_a_damaged_history_as_it_is(tmp_path, text, reason):
    out, history = _prepared(tmp_path / "processed"), tmp_path / "exercises"
    history.mkdir()
    (history / "01.json").write_text(text)
    lines = exercises.notebook_01(out, "auto", False, SAMPLE, history)
    assert lines == [
        FILTERS_NOT_TRIED,
        f"· SYSTEM_TURN = False: cannot compare with an earlier run: {history / '01.json'} is damaged ({reason}), so "
        "this run is not remembered; the file is left as it is: repair or remove it",
        RAW_NOT_TRIED,
    ]
    assert (history / "01.json").read_text() == text


def test_notebook_01_leaves_a_file_where_its_history_folder_goes(tmp_path):
    out, history = _prepared(tmp_path / "processed"), tmp_path / "exercises"
    history.write_bytes(b"my notes\n")
    lines = exercises.notebook_01(out, "auto", True, SAMPLE, history)
    assert lines == [
        FILTERS_NOT_TRIED,
        f"· SYSTEM_TURN = False: not tried (this run's train split: 1,000 tokens); {history} is a file, not a folder, "
        "so this run is not remembered; the file is left as it is: move it away",
        RAW_NOT_TRIED,
    ]
    assert history.read_bytes() == b"my notes\n"
