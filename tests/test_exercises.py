"""The check cells under "Try this": right, wrong and not-tried runs each get their mark (made-up run folders)."""

import json

import torch
from safetensors.torch import save_file

from utils import exercises


def _run(folder, adapter_rows: int | None = None, r: int = 16, lrs=(), rows: int | None = None):
    """A finished run folder as utils.sft leaves it, with only what the checks read."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"tool": "utils.sft", "settings": {}, "status": "finished"}))
    history = [{"step": i + 1, "learning_rate": lr, "loss": 1.0} for i, lr in enumerate(lrs)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (folder / "speed.json").write_text(json.dumps({"packed_rows": rows}))
    if adapter_rows:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": r}))
        save_file({"a": torch.zeros(adapter_rows, 8)}, str(folder / "adapter" / "adapter_model.safetensors"))
    return folder


def test_notebook_02_marks_each_run(tmp_path):
    main = _run(tmp_path / "qlora", adapter_rows=16, rows=77)
    assert [line[0] for line in exercises.notebook_02(tmp_path, main)] == ["·"] * 4  # nothing tried
    _run(tmp_path / "qlora-r64", adapter_rows=64, r=64)
    _run(tmp_path / "qlora-split", rows=78)
    _run(tmp_path / "qlora-10", lrs=[0.0, 0.01, 0.01, 0.005])  # the first step at the peak counts
    lines = exercises.notebook_02(tmp_path, main)
    assert lines[0] == "✓ rank 64: r = 64, 512 adapter parameters, 4.0x rank 16's 128"
    assert lines[1] == "✓ bfd_split: 78 packed rows, against 77 with bfd"
    assert lines[2] == "✓ ten steps: the learning rate is 0 at step 1 and peaks at step 2 (0.01)"
    assert lines[3].startswith("· a second run: last written: qlora-r64 ")


def test_notebook_02_says_what_a_run_showed_instead(tmp_path):
    main = _run(tmp_path / "qlora", adapter_rows=16, rows=77)
    _run(tmp_path / "qlora-r64", adapter_rows=32, r=32)
    _run(tmp_path / "qlora-split", rows=77)
    _run(tmp_path / "qlora-10", lrs=[0.001, 0.005, 0.01, 0.002])
    lines = exercises.notebook_02(tmp_path, main)
    assert [line[0] for line in lines[:3]] == ["✗"] * 3
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
