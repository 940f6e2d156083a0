"""Stored notebooks are clean and parameterised; the whole series executes in the smoke profile, in order."""

import ast
import json
import math
import os
import re
import shlex
import subprocess
import sys

import nbformat
import pytest
from helpers import cpu_path_env, loss_halved, try_this_items

from tools.notebook_runner import notebooks, printed_text, run_notebook
from tools.setup_cell import SETUP_CELL
from utils import REPO_ROOT, exercises
from utils.curves import PLANTED_TRUTH
from utils.hardware import ULTRACHAT_PACKED_ROWS, ULTRACHAT_TOKENS
from utils.sampling import logged_answers
from utils.tiny_world import CHECK_QUESTIONS

ALL = notebooks()


def test_the_series_is_there():
    assert [p.name[:2] for p in ALL] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_stored_without_outputs_and_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'PROFILE = "auto"' in tagged[0].source
    assert nb.cells[0].cell_type == "markdown" and "**Hardware.**" in nb.cells[0].source
    assert "**Time.**" in nb.cells[0].source
    assert "## Try this" in nb.cells[-2].source  # the exercises, then the cell that checks the learner's runs
    assert nb.cells[-1] is code[-1] and f"exercises.notebook_{path.name[:2]}(" in code[-1].source
    assert code[0].source == SETUP_CELL and len(SETUP_CELL.splitlines()) <= 10  # one short set-up cell


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Run 01 to 05 in the smoke profile, as `make tutorial` does; 04 and 05 read what 02 and 03 wrote. The kernels'
    bitsandbytes takes the AVX512-BF16 path whatever this CPU has (tests/test_cpu_paths.py compares both paths)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in cpu_path_env({"PYTHONPATH": os.environ.get("PYTHONPATH", "")}, avx512bf16=True).items():
            env.setenv(name, value)
        return _series(tmp_path_factory)


def _series(tmp_path_factory):
    base = tmp_path_factory.mktemp("series")
    runs = base / "runs"
    params = {
        "01": dict(OUT=str(base / "processed")),
        "02": dict(OUTPUT_DIR=str(runs / "qlora")),
        "03": dict(LAUNCH_DIR=str(runs / "qlora-ddp"), SMOKE_STEPS=4, PLOTS=str(base / "plots")),
        "04": dict(RUNS=str(runs), PLOTS=str(base / "plots")),
        "05": dict(RUNS=str(runs), MAX_NEW_TOKENS=32),
    }
    texts = {}
    for path in ALL:
        number = path.name[:2]
        texts[number] = printed_text(
            run_notebook(path, "smoke", out_dir=base / "executed", progress_bar=False, **params[number])
        )
    return base, texts


def test_notebook_01(series):
    base, texts = series
    assert "Profile: smoke — asked for explicitly" in texts["01"]
    assert (  # the one reference for the size of ultrachat_200k (utils.hardware)
        f"HuggingFaceH4/ultrachat_200k train_sft as the card packed it: {ULTRACHAT_PACKED_ROWS:,} rows of 2,048 "
        f"tokens, ~{ULTRACHAT_TOKENS / 1e6:.1f}M tokens" in texts["01"]
    )
    assert (
        "23 rows in, 16 kept, 7 dropped, 1 truecased; filters applied: structure, truecase, disclaimer, "
        "duplicate_prompt" in texts["01"]
    )
    assert "594 rows in, 583 kept, 11 dropped, 0 truecased (0 messages)" in texts["01"]  # with the pirate dialogues
    assert "filters applied: structure | audited only: truecase, disclaimer, duplicate_prompt" in texts["01"]
    assert (
        "[('<s>', 1), ('▁<', 523), ('|', 28766), ('system', 6574), ('|', 28766), ('>', 28767), ('<0x0A>', 13), "
        "('</s>', 2), ('▁', 28705), ('<0x0A>', 13)" in texts["01"]
    )  # the empty system turn, in the card's ids
    assert "card  : [('<0x0A>', 13), ('</s>', 2), ('▁', 28705), ('<0x0A>', 13), ('<', 28789)" in texts["01"]
    assert "today : [('<0x0A>', 13), ('</s>', 2), ('<0x0A>', 13), ('<', 28789)" in texts["01"]
    assert "50 tokens the card's way, 47 today's" in texts["01"]
    assert (base / "processed" / "report.json").is_file()
    assert "· FILTERS = \"all\": not tried (this run: FILTERS = 'auto', 11 rows dropped" in texts["01"]  # the check


def test_notebook_02(series):
    base, texts = series
    assert "28 linear layers are 4-bit" in texts["02"]
    assert "  learning_rate                                0.0002 -> 0.005" in texts["02"]  # the smoke diff
    assert "every token: 98.8% of the tokens carry loss, assistant only: 36.7% of the tokens carry loss" in texts["02"]
    assert "Starting a new run." in texts["02"]
    assert "trainable parameters: 83,968 of 4,401,728 (1.91%)" in texts["02"]
    assert re.search(r"row \d+ holds \d+ tokens in [2-9] dialogues", texts["02"])
    assert "28 adapted weights: each equals W + 1·B·A computed in float32 and rounded once" in texts["02"]
    assert "28 LoRA pairs in the adapter, each used exactly once; 11 other tensors bit-identical" in texts["02"]
    assert "PROBLEM" not in texts["02"]
    assert "merged vs 16-bit base + adapter          : largest logit difference" in texts["02"]
    assert "merged vs 4-bit base + adapter (trained) : largest logit difference" in texts["02"]
    assert "merged vs 16-bit base alone              : largest logit difference" in texts["02"]
    medians = r"train loss \d+\.\d{3} -> \d+\.\d{3} \(medians of the first and last tenth of 386 steps\)"
    assert re.search(medians + r"; eval loss \d+\.\d{3} -> ", texts["02"])
    assert (base / "runs" / "qlora" / "merged" / "model.safetensors").is_file()
    assert json.loads((base / "runs" / "qlora" / "run.json").read_text())["status"] == "finished"
    history = json.loads((base / "runs" / "qlora" / "trainer_state.json").read_text())["log_history"]
    assert loss_halved([h["loss"] for h in history if "loss" in h])  # the tiny base visibly learns
    assert "· rank 64: not run yet (runs/qlora-r64)" in texts["02"]  # the check cell
    assert "· answers only: not run yet (runs/qlora-answers)" in texts["02"]


def _table_cells(executed, column: str) -> list[str]:
    """The values of one column of the trainer's last progress table in an executed notebook."""
    nb = nbformat.read(executed, as_version=4)
    html = [
        o.data["text/html"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "<th>Epoch</th>" in o.get("data", {}).get("text/html", "")
    ][-1]
    head, body = html.split("</thead>")
    index = re.findall(r"<th>(.*?)</th>", head).index(column)
    return [re.findall(r"<td>(.*?)</td>", row)[index] for row in body.split("</tr>") if "<td>" in row]


def test_notebook_02_shows_the_runs_numbers_as_they_are(series):
    """Token counts as whole numbers; each epoch's median beside the one step the table shows; the gap between eval
    and train loss named from the run's own numbers (per kind of dialogue: no overfitting, the test split's mix)."""
    base, texts = series
    state = json.loads((base / "runs" / "qlora" / "trainer_state.json").read_text())
    history = state["log_history"]
    tokens = [str(h["eval_num_tokens"]) for h in history if "eval_loss" in h]
    assert _table_cells(base / "executed" / ALL[1].name, "Num Tokens") == tokens and all(t.isdigit() for t in tokens)
    last = {e: [h["loss"] for h in history if "loss" in h and -(-h["epoch"] // 1) == e][-1] for e in (1, 2)}
    for epoch in (1, 2):
        assert re.search(
            rf"^  epoch {epoch}: median \d\.\d{{3}} over its 193 logged steps \(its last step, in the table: "
            rf"{last[epoch]:.3f}\)$",
            texts["02"],
            re.MULTILINE,
        ), texts["02"][-3000:]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert "learning rate 0.005, 2 epoch(s), 386 steps" in texts["02"]
    assert re.search(r"^train loss at the end \d\.\d{3} \(median of the last tenth of the steps\)$", texts["02"], re.M)
    assert f"last eval loss {evals[-1]:.3f}, perplexity {math.exp(evals[-1]):.1f}" in texts["02"]
    assert re.search(
        r"^  tiny world  trained on \d\.\d{3} \(64 dialogues\)   held out \d\.\d{3} \(12 dialogues\)$",
        texts["02"],
        re.M,
    )
    assert re.search(
        r"^  general     trained on \d\.\d{3} \(49 dialogues\)   held out \d\.\d{3} \(6 dialogues\)$", texts["02"], re.M
    )
    assert "No sign of overfitting: on held-out dialogues of each kind the loss is at most 10% above" in texts["02"]
    assert (
        "The eval loss is above the train loss for another reason: general dialogues, which the model predicts worst "
        "whether it trained on them or not, are 30% of the test split's tokens and 11% of the training split's."
    ) in texts["02"]


def test_notebook_03(series):
    base, texts = series
    assert "skipped: one node of 8 GPUs needed, this machine has 0" in texts["03"]
    # Kaggle's path, run for real: notebook_launcher forks 2 CPU processes from the kernel, which must not have
    # imported bitsandbytes or initialised CUDA in any cell before it
    assert "ready for notebook_launcher: yes" in texts["03"]
    assert "[rank 0/2] step 4 loss" in texts["03"] and "[rank 1/2] step 4 loss" in texts["03"]
    # a DDP replica holds the whole model: the 4-bit weights counted by their shape, as notebook 02 counts them
    assert "this rank holds 4,401,728 of 4,401,728 parameters (100%: a full replica)" in texts["03"]
    launched = json.loads((base / "runs" / "qlora-ddp" / "run.json").read_text())
    assert launched["status"] == "finished" and launched["settings"]["world_size"] == 2
    assert "rank 0 of 2, 4 steps; its own loss per step: " in texts["03"] and "rank 1 of 2, 4 steps;" in texts["03"]
    assert "Changed from configs/sft_qlora.yaml for this run" in texts["03"]  # the 2-process run's diff
    assert re.search(r"\[rank 0/2\] holds [\d,]+ of 4,317,760 parameters \(50%\)", texts["03"])  # FSDP
    assert "checkpoints: ['checkpoint-4'] | trainer_state.json: True" in texts["03"]
    assert "· accumulation, 16 GPUs x 4: no prediction yet" in texts["03"]  # the check cell
    # one size of ultrachat_200k: the reference gives the card's stop; the offline estimate is only its check
    assert (
        f"reference: {ULTRACHAT_PACKED_ROWS:,} packed rows (~{ULTRACHAT_TOKENS / 1e6:.1f}M tokens): the card's trainer "
        "stops at step 272 of 406, epoch 0.67" in texts["03"]
    )
    assert "offline estimate: 146,735 packed rows: step 286, 5% more than the card" in texts["03"]
    assert (  # the steps table counts the same rows TRL 1.x's way, and says why it is one step more
        "273 optimizer steps per epoch in TRL 1.x: 272 full global batches of 512 and a last one of 192 rows; the "
        "card's trainer did not step that one: 272 steps" in texts["03"]
    )
    assert re.search(r"^done: 4 steps, 0\.\d\d of an epoch of this data, ", texts["03"], re.MULTILINE)
    executed = nbformat.read(base / "executed" / "03_full_sft_multi_gpu.ipynb", as_version=4)
    shown = [o.get("data", {}).get("text/html", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not any("Epoch" in html for html in shown)  # transformers' table ("Epoch 0/1" after 4 steps) is off
    assert (base / "plots" / "memory_per_gpu.png").is_file()  # the memory figure, saved


def test_notebook_04(series):
    base, texts = series
    assert "qlora-ddp    4 train logs" in texts["04"] and "qlora        386 train logs" in texts["04"]
    assert "planted A: no diagnosis yet (choose from: learning rate x10, no warm-up, overfitting)" in texts["04"]
    assert (base / "plots" / "loss_curves.png").is_file() and (base / "plots" / "loss_curves.svg").is_file()
    assert "· SMOOTHING = 0: not tried" in texts["04"] and "· DIAGNOSIS: not made yet" in texts["04"]


def test_notebook_05(series):
    _, texts = series
    assert "You are a friendly chatbot who always responds in the style of a pirate</s>" in texts["05"]
    assert "re-ran qlora (merged) with seed 42: identical answers" in texts["05"]
    assert re.search(r"qlora \(merged\): \d of 4 answers ended at EOS", texts["05"])
    assert "GPU memory: no GPU" in texts["05"]
    n = len(CHECK_QUESTIONS)
    held = dict(re.findall(r"^  (.+): held for (\d+ of \d+)$", texts["05"], re.MULTILINE))
    assert held == {  # the lesson, per question, on questions no training dialogue asked
        "pirate voice with the pirate prompt": f"{n} of {n}",
        "pirate voice without it": f"{n} of {n}",
        "stop at </s>": f"{2 * n} of {2 * n}",
        "about the thing asked": f"{2 * n} of {2 * n}",
        "no invented words": f"{2 * n} of {2 * n}",
    }, texts["05"][-3000:]
    for prompt in ("with the pirate prompt", "without a system prompt"):  # the base: no stop, not about the question
        assert re.search(
            rf"^base {prompt}: 0/{8 * n} answers stop at </s>, \d+/{8 * n} talk like a pirate, "
            rf"\d/{8 * n} are about the thing asked",
            texts["05"],
            re.MULTILINE,
        ), texts["05"][-3000:]
    assert "· almost greedy: run both commands" in texts["05"]  # the check cell, nothing tried yet
    marked = re.search(
        r"^(\d+) of the fine-tunes' (\d+) answers in sections 3 and 4 write a turn marker "
        r"\(<\|user\|> or another <\|\) themselves[.:]$",
        texts["05"],
        re.MULTILINE,
    )
    assert marked and int(marked[2]) == 2 * 4 + 2 * 8 * n, texts["05"][-3000:]  # 2 models x 4; 8 x 2 prompts x n
    assert "The card's recipe puts the loss on every token, the user's turns included" in texts["05"]


def test_executed_outputs_are_clean(series):
    """What a learner reads: no widgets, no half-drawn progress bars, no warnings, one stream of each kind per cell."""
    base, _ = series
    for path in sorted((base / "executed").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            streams = [o for o in cell.outputs if o.output_type == "stream"]
            runs = "".join("s" if o.output_type == "stream" else "|" for o in cell.outputs).split("|")
            displays = len(runs) - 1  # a display (a table, the Trainer's progress) splits the text around it
            assert len(streams) <= len({o.name for o in streams}) + 1 + displays, (
                path.name,
                i,
            )  # stderr may split once
            text = "".join(o.text for o in streams)
            assert "\r" not in text and "Warning" not in text and "warn(" not in text, (path.name, i, text[-300:])
            for output in cell.outputs:
                assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}), (path.name, i)
                assert (
                    output.output_type != "execute_result"
                    or "text/plain" not in output.data
                    or not re.fullmatch(r"\d+", output.data["text/plain"])
                ), (path.name, i)  # a stray gc.collect() value
        streamed = (
            next(c for c in nb.cells if "streamer=TextStreamer" in c.source) if path.name.startswith("05") else None
        )
        if streamed is not None:
            assert len(streamed.outputs) == 1  # the streamed tokens are one output


def test_a_finished_notebook_run_is_recognised(series):
    base, _ = series
    adapter = base / "runs" / "qlora" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    text = printed_text(
        run_notebook(
            ALL[1], "smoke", out_dir=base / "again", progress_bar=False, OUTPUT_DIR=str(base / "runs" / "qlora")
        )
    )
    assert f"already trained: 386/386 steps in {base / 'runs' / 'qlora'}; set FRESH = True" in text
    assert "Resuming" not in text and "interrupted" not in text
    assert "This run finished earlier; its own report:" in text and "tokens_per_second" in text
    assert "already merged:" in text
    assert "No sign of overfitting" in text  # measured on the adapter reloaded from the finished run
    assert adapter.stat().st_mtime_ns == before


# --- every "Try this" runs exactly as written ------------------------------------------------------------------------
def test_try_this_04_parameters_run(series, tmp_path):
    """Notebook 04's items on the series' runs (01's are in test_try_this.py)."""
    base, _ = series
    path = next(p for p in ALL if p.name.startswith("04"))
    params, commands = try_this_items(path)
    assert len(params) >= 3 and not commands
    for name, value in params:
        text = printed_text(
            run_notebook(
                path,
                "smoke",
                out_dir=tmp_path / name,
                progress_bar=False,
                **{"RUNS": str(base / "runs"), "PLOTS": str(tmp_path), name: ast.literal_eval(value)},
            )
        )
        if name == "DIAGNOSIS":  # the Try this asks whether its diagnosis is right: the check cell knows
            right = ast.literal_eval(value) == PLANTED_TRUTH
            assert f"{'✓' if right else '✗'} DIAGNOSIS: {3 if right else ''}" in text
        else:  # the check cell saw the run show what the folded answer says
            assert f"✓ {name} = {value}: " in text, text[-1500:]


def test_try_this_05_commands_run(series, tmp_path, command_env):
    """Notebook 05's commands sample the series' models (02's and 03's are in test_try_this.py)."""
    base, _ = series
    _, commands = try_this_items(next(p for p in ALL if p.name.startswith("05")))
    assert len(commands) >= 3
    env = {**command_env, "MISTRAL_SFT_RUNS": str(base / "runs")}  # sampling logs its answers there too
    for command in commands:
        result = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    lines = exercises.notebook_05(logged_answers(base / "runs" / "sampling" / "answers.jsonl"))
    assert len(lines) == 3 and all(line.startswith("✓") for line in lines), lines  # the check cell, on the log


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """papermill parses the parameters cell to show and check overrides; an apostrophe in a comment breaks it."""
    from papermill.inspection import inspect_notebook

    nb = nbformat.read(path, as_version=4)
    source = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [line.split("=")[0].strip() for line in source.splitlines() if "=" in line and not line.startswith("#")]
    assert list(inspect_notebook(str(path))) == names


# --- the first cell, outside a checkout (as on Colab) ------------------------------------------------------------
def _run_setup_cell(cwd, **env):
    return subprocess.run(
        [sys.executable, "-c", SETUP_CELL],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **env},
    )


def test_setup_cell_reuses_an_existing_checkout(tmp_path):
    (tmp_path / "mistral-sft").symlink_to(REPO_ROOT)  # what a first run left behind
    result = _run_setup_cell(tmp_path)
    assert result.returncode == 0, result.stderr
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert result.stdout.strip() == f"collection at {tmp_path / 'mistral-sft'} (commit {commit})"  # a tag can move


def test_setup_cell_says_what_to_set_when_the_clone_fails(tmp_path):
    result = _run_setup_cell(tmp_path, MISTRAL_SFT_REPO=str(tmp_path / "no-such-repo"), MISTRAL_SFT_REF="v9")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Could not clone {tmp_path / 'no-such-repo'} at v9: set MISTRAL_SFT_REPO and MISTRAL_SFT_REF (see README)."
    )
    assert not (tmp_path / "mistral-sft").exists()
