"""QLoRA training in the smoke profile: 4-bit layers, LoRA-only gradients, falling loss, reload, merge, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import RECIPE, smoke_argv

from utils import REPO_ROOT, sft
from utils.hardware import PROFILES
from utils.inspection import label_checks, print_recipe_changes, recipe_changes
from utils.model import load_adapter, load_model, merge_adapter, parameter_count
from utils.recipe import MISTRAL_LINEAR_MODULES, resolve
from utils.training import finish_run, start_run, stop_if_diverged


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit weights by their real shape (moved here from utils.model)."""
    counts = [(parameter_count(p), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in counts if trainable), sum(n for n, _ in counts)


def smoke_settings(output_dir, *extra):
    """The settings of a smoke run of the recipe, as the command line resolves them."""
    argv = ["--config", RECIPE, "--profile", "smoke", "--output_dir", str(output_dir), *extra]
    return resolve(argv), argv


def smoke_args(output_dir, *extra):
    settings, _ = smoke_settings(output_dir, *extra)
    script_args, training_args, model_args, _ = settings.build()
    return settings.profile, script_args, training_args, model_args


def train_smoke(output_dir, *extra):
    """Start, build and run a smoke training run through the collection's one training path; return the trainer."""
    settings, _ = smoke_settings(output_dir, *extra)
    args = settings.build()
    run = start_run(args)
    trainer = sft.trainer_for(args)
    trainer.train(resume_from_checkpoint=run.resume_from)
    stop_if_diverged(trainer, run)
    trainer.save_model(str(Path(args.training.output_dir) / "adapter"))
    finish_run(trainer, run)
    return trainer, args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    trainer, args = train_smoke(out, "--max_steps", "30", "--save_steps", "10")
    return trainer, args.model, out


def test_recipe_matches_the_handbook_qlora_config():
    script_args, training_args, model_args, run_args = resolve(["--config", RECIPE], None).build()
    assert (model_args.load_in_4bit, model_args.bnb_4bit_quant_type) == (True, "nf4")
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 16, 0.05)
    assert model_args.lora_target_modules == list(MISTRAL_LINEAR_MODULES)
    assert training_args.learning_rate == 2e-4 and training_args.lr_scheduler_type == "cosine"
    assert training_args.warmup_steps == 0.1 and training_args.num_train_epochs == 1
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (4, 2)
    assert (training_args.max_length, training_args.packing) == (2048, True)
    assert training_args.activation_checkpointing is True
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert training_args.eval_strategy == "epoch" and training_args.logging_steps == 5
    assert (training_args.save_steps, training_args.save_total_limit, training_args.seed) == (100, 1, 42)
    assert training_args.report_to == ["tensorboard"]
    assert script_args.dataset_test_split == "test" and run_args.profile == "auto"


@pytest.mark.parametrize("name", ["gpu-16gb", "gpu-24gb", "gpu-40gb", "gpu-80gb"])
def test_gpu_profiles_keep_eight_sequences_per_step(name):
    settings = PROFILES[name].training
    assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] == 8


def test_cli_overrides_beat_the_profile(tmp_path):
    _, _, training_args, _ = smoke_args(tmp_path, "--max_length", "128", "--learning_rate", "1e-3")
    assert training_args.max_length == 128 and training_args.learning_rate == 1e-3
    assert training_args.per_device_train_batch_size == 1  # from the smoke profile


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_target_modules", "q_proj", "qkv_proj"], "error: unknown LoRA target module(s) qkv_proj; "),
        (["--max_length", "0"], "error: max_length must be a positive number, got 0"),
        (
            ["--per_device_train_batch_size", "-1"],
            "error: per_device_train_batch_size must be a positive number, got -1",
        ),
        (["--dataset_name", "/no/such/folder"], "error: dataset /no/such/folder: no such file or folder"),
        (["--dataset_name", "file.jsonl"], "error: dataset file.jsonl: no such file or folder: file.jsonl"),
        (
            ["--dataset_name", "HuggingFaceH4/nope"],
            "error: dataset HuggingFaceH4/nope: the Hugging Face Hub is unreachable",
        ),
        (["--lora_r", "0"], "error: lora_r must be a whole number of 1 or more, got 0"),
        (["--learning_rate", "nan"], "error: learning_rate must be a positive number, got nan"),
        (["--num_train_epochs", "0"], "error: num_train_epochs must be positive (or set max_steps), got 0.0"),
        (["--lora_dropout", "1.5"], "error: lora_dropout must be in [0, 1), got 1.5"),
        (["--config", "no/such.yaml"], "error: config file no/such.yaml not found"),
        (
            ["--card_schedule", "true", "--max_steps", "2"],
            "error: card_schedule plans its own steps (dialogues / global batch, as TRL 0.7.x did), so max_steps 2 "
            "would be ignored: leave max_steps unset, or set card_schedule false",
        ),
    ],
)
def test_bad_configuration_fails_in_one_line(extra, message, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights must not load"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = sft.cli(["--config", RECIPE, "--profile", "smoke", "--output_dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message)


def test_malformed_config_files_are_one_line(tmp_path, capsys):
    for name, text in (("bad.yaml", "learning_rate: [\n"), ("bad.json", '{"learning_rate":'), ("list.yaml", "- 1\n")):
        (tmp_path / name).write_text(text)
        assert sft.cli(["--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: config file {tmp_path / name} ")


@pytest.mark.parametrize("key", ["max_steps", "seed", "adam_beta1", "lora_dropout"])
def test_a_null_in_the_recipe_is_one_line(key, tmp_path, capsys, monkeypatch):
    import yaml
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights must not load"))
    recipe = {**yaml.safe_load(Path(RECIPE).read_text()), key: None}
    (tmp_path / "null.yaml").write_text(yaml.safe_dump(recipe))
    code = sft.cli(["--config", str(tmp_path / "null.yaml"), "--profile", "smoke", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {key} must be ") and err[0].endswith("got None")


def test_one_lora_target_module_is_a_list(tmp_path):
    *_, model_args = smoke_args(tmp_path, "--lora_target_modules", "q_proj")
    assert model_args.lora_target_modules == ["q_proj"]


def test_a_dataset_without_test_split_turns_evaluation_off(tmp_path, capsys):
    from utils.prepare_data import main as prepare_main

    data = tmp_path / "data"
    assert (
        prepare_main(
            [
                "--source",
                str(REPO_ROOT / "data/sample/ultrachat_raw/ultrachat_raw.jsonl"),
                "--out",
                str(data),
                "--test-fraction",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    *_, training_args, _ = smoke_args(tmp_path / "out", "--dataset_name", str(data))
    assert training_args.eval_strategy == "no"
    assert f"Note: dataset {data} has no 'test' split, so evaluation is off" in capsys.readouterr().out


def test_trainable_share_counts_4bit_weights_by_their_real_size():
    from trl import ModelConfig, get_quantization_config

    from utils.assets import ensure_tiny_model

    args = ModelConfig(
        model_name_or_path=str(ensure_tiny_model()),
        dtype="float32",
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        attn_implementation="sdpa",
    )
    unquantized = sum(p.numel() for p in load_model(args).parameters())
    quantized = load_model(args, get_quantization_config(args))
    assert sum(p.numel() for p in quantized.parameters()) < unquantized  # packed: two 4-bit values per byte
    assert count_parameters(quantized)[1] == unquantized == 4_317_760  # not 4,291,136


def test_the_smoke_profile_prints_its_changes_as_a_diff(tmp_path, capsys):
    settings, argv = smoke_settings(tmp_path)
    changes = {name: (old, new) for name, old, new, _ in recipe_changes(argv, settings)}
    assert changes["learning_rate"] == (2e-4, 5e-3) and changes["max_length"] == (2048, 256)
    assert changes["num_train_epochs"] == (1, 2) and changes["activation_checkpointing"] == ("(TRL default)", False)
    assert "lora_r" not in changes and "lr_scheduler_type" not in changes
    print_recipe_changes(argv, settings)
    out = capsys.readouterr().out
    assert "Changed from " in out and "learning_rate" in out and "0.0002 -> 0.005  (profile)" in out


def test_linear_layers_are_4bit_and_only_lora_trains(trained):
    import bitsandbytes as bnb

    trainer, _, _ = trained
    linear4 = [n for n, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 4 * 7  # 4 layers x (q, k, v, o, gate, up, down)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 4 * 7 * 2


def test_loss_falls(trained):
    trainer, _, _ = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15


def test_labels_keep_eos(trained):
    checks = label_checks(trained[0])
    assert checks["eos_tokens"] > 0 and checks["eos_tokens_in_loss"] == checks["eos_tokens"]
    assert checks["pad_token"] == "<unk>" and checks["loss_token_share"] > 0.9


def test_outputs_on_disk(trained):
    _, _, out = trained
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "chat_template.jinja").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30 and sum("loss" in h for h in state["log_history"]) == 30
    counts = [h["num_tokens"] for h in state["log_history"] if "num_tokens" in h]
    assert len(counts) == 30 and all(type(n) is int for n in counts)  # TRL logs a float: WholeTokenCounts
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-30"]  # save_total_limit 1


def test_the_notebook_table_shows_token_counts_as_whole_numbers():
    """SFTTrainer puts the collection's callbacks before transformers' notebook table: TRL's eval_num_tokens, a float
    because TRL averages what it logs, reaches the table as an int."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler
    from transformers.utils.notebook import NotebookProgressCallback, text_to_html_table

    from utils.training import callbacks

    args = SimpleNamespace(eval_strategy="epoch", run=SimpleNamespace(card_schedule=False), world_size=1)
    table = NotebookProgressCallback()
    handler = CallbackHandler([*callbacks(args, 10, 10), table], None, None, None, None)
    state = TrainerState(max_steps=10, epoch=1.0)
    handler.on_train_begin(args, state, TrainerControl())
    state.log_history.append({"loss": 1.5, "num_tokens": 480.0, "step": 5})
    handler.on_log(args, state, TrainerControl(), {"loss": 1.5, "num_tokens": 480.0})
    metrics = {"eval_loss": 2.0, "eval_num_tokens": 48088.0, "num_input_tokens_seen": 48088}
    state.log_history.append({**metrics, "step": 10})
    handler.on_log(args, state, TrainerControl(), metrics)  # Trainer.evaluate logs, then calls on_evaluate
    handler.on_evaluate(args, state, TrainerControl(), metrics)
    html = text_to_html_table(table.training_tracker.inner_table)
    assert "<th>Num Tokens</th>" in html and "<td>48088</td>" in html and "48088.0" not in html
    assert state.log_history[0]["num_tokens"] == 480 and type(state.log_history[1]["eval_num_tokens"]) is int


def _logits(model, tokenizer):
    inputs = tokenizer("<|user|>\nHow do I keep basil alive?</s>\n<|assistant|>\n", return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_adapter_reloads_with_the_same_logits(trained):
    trainer, model_args, out = trained
    trainer.model.eval()
    before = _logits(trainer.model, trainer.processing_class)
    from trl import get_quantization_config

    base = load_model(model_args, get_quantization_config(model_args))
    reloaded = load_adapter(base, out / "adapter").eval()
    assert reloaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16
    after = _logits(reloaded, trainer.processing_class)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    assert not torch.allclose(
        before,
        _logits(load_model(model_args, get_quantization_config(model_args)), trainer.processing_class),
        atol=1e-3,
    )  # the adapter matters


def test_merged_model_is_base_plus_adapter(trained):
    from transformers import AutoModelForCausalLM

    from utils.model import check_merge

    trainer, model_args, out = trained
    merged_dir = merge_adapter(model_args.model_name_or_path, out / "adapter", out / "merged", "bfloat16")
    assert (merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    result = check_merge(model_args.model_name_or_path, out / "adapter", merged_dir)
    assert result.ok and (result.adapted, result.pairs) == (28, 28), result.problems


def _run(out, extra=()):
    cmd = [sys.executable, "-m", "utils.sft", *smoke_argv(out, *extra, steps=8, save=4)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final(out):
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return state["global_step"], [h["loss"] for h in state["log_history"] if "loss" in h][-1]


def test_killed_run_resumes_to_the_same_end(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(straight).wait(timeout=300) == 0

    proc = _run(killed)
    deadline = time.time() + 240
    while not (killed / "checkpoint-4" / "trainer_state.json").is_file() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "trainer_state.json").exists()  # it really died before the end

    resumed = _run(killed)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "Resuming from " in output
    step, loss = _final(killed)
    # Not bit for bit: a resumed run's losses differ from the straight run's from the first step after the
    # checkpoint by ~1e-5 relative (dropout off too), and the difference grows to ~3e-4 by step 8 on the pretrained
    # tiny model (with the random one it stayed under 1e-4 absolute). A wrong resume (data, step or schedule) is off
    # by whole units.
    assert (step, pytest.approx(loss, rel=1e-3)) == _final(straight)


# --- re-runs, changed settings, two runs at once, damaged checkpoints ------------------------------------------------
def _cli(out, *extra):
    return sft.cli(smoke_argv(out, *extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _cli(out, "--save_total_limit", "2") == 0
    return out


def test_a_finished_run_is_recognised_and_left_alone(finished, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file() and p.name != ".lock"}
    assert _cli(finished, "--save_total_limit", "2") == 0
    out = capsys.readouterr().out
    assert f"already trained: 4/4 steps in {finished}; set FRESH = True (--fresh true)" in out
    assert "its report: 4 steps" in out and "Resuming" not in out and "interrupted" not in out
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_changed_setting_is_refused_in_one_line(finished, capsys):
    assert _cli(finished, "--save_total_limit", "2", "--lora_r", "64") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {finished} holds a run with lora_r=16; this run asks for lora_r=64. Set FRESH = True "
        "(--fresh true) to start over there, or choose another output folder"
    ]


@pytest.mark.parametrize(
    ("flag", "value", "saved"),
    [
        ("--use_rslora", "true", False),  # the LoRA scale alpha/r -> alpha/sqrt(r): 1 -> 4 mid-run
        ("--use_dora", "true", False),
        ("--assistant_only_loss", "true", False),  # steps on every token, then on answers only
        ("--optim", "adafactor", "adamw_torch_fused"),  # another optimizer's state on disk
    ],
)
def test_every_setting_that_changes_training_is_recorded_and_checked(finished, capsys, flag, value, saved):
    setting = flag.removeprefix("--")
    assert json.loads((finished / "run.json").read_text())["settings"][setting] == saved
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file() and p.name != ".lock"}
    assert _cli(finished, "--save_total_limit", "2", flag, value) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {finished} holds a run with {setting}={saved!r}; this run ")
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_folder_in_use_is_refused(finished, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from utils import runs; from pathlib import Path; "
            f"runs.lock(Path({str(finished)!r})); print('locked', flush=True); import time; "
            "time.sleep(60)",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _cli(finished, "--save_total_limit", "2") == 2
        assert capsys.readouterr().err == (
            f"error: {finished.resolve()} is in use by another training run (pid "
            f"{holder.pid}); wait for it to end or choose another output folder\n"
        )
    finally:
        holder.kill()
        holder.wait()


def test_a_users_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert _cli(tmp_path) == 2
    assert (
        capsys.readouterr().err == f"error: output folder {tmp_path} holds files this tool did not write; "
        "choose another folder\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _interrupt(run_dir):
    """Make a finished run look killed after its last checkpoint."""
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "status": "running"}))
    (run_dir / "trainer_state.json").unlink()


def test_damaged_checkpoints_are_skipped_by_name(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _interrupt(run)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        state = json.loads((run / ckpt / "trainer_state.json").read_text())
        (run / ckpt / "trainer_state.json").write_text(json.dumps({**state, "max_steps": 8}))  # not the last step
    adapter = run / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    from utils.runs import checkpoint_problem, newest_loadable_checkpoint

    assert checkpoint_problem(run / "checkpoint-4").startswith("adapter_model.safetensors is damaged")
    assert newest_loadable_checkpoint(run) == (
        str(run / "checkpoint-2"),
        ["skipped checkpoint-4: adapter_model.safetensors is damaged (SafetensorError)"],
    )
    (run / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')  # truncated
    assert newest_loadable_checkpoint(run) == (
        None,
        [
            "skipped checkpoint-4: adapter_model.safetensors is damaged (SafetensorError)",
            "skipped checkpoint-2: trainer_state.json is damaged",
        ],
    )
    assert _cli(run, "--save_total_limit", "2") == 0
    out = capsys.readouterr().out
    assert "skipped checkpoint-4: adapter_model.safetensors is damaged" in out
    assert "Starting a new run. No checkpoint could be loaded, so training starts over." in out
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 4


def test_a_run_killed_after_its_last_checkpoint_finishes_without_another_step(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _interrupt(run)
    assert _cli(run, "--save_total_limit", "2") == 0
    out = capsys.readouterr().out
    assert f"Finishing from {run / 'checkpoint-4'}: the previous run reached its last step (4/4)" in out
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 4  # never 5
    assert (
        "already trained: 4/4"
        in (capsys.readouterr(), _cli(run, "--save_total_limit", "2"), capsys.readouterr().out)[2]
    )


def test_fresh_starts_over_in_its_own_folder(finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "my_notes.txt").write_text("kept")
    assert _cli(run, "--save_total_limit", "2", "--lora_r", "8", "--fresh", "true") == 0
    assert "Starting a new run." in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["settings"]["lora_r"] == 8
    assert (run / "my_notes.txt").read_text() == "kept"


def test_the_card_schedule_plans_over_dialogues_and_stops_when_the_data_ends(tmp_path, capsys):
    out = tmp_path / "card"
    code = sft.cli(
        [
            "--config",
            RECIPE,
            "--profile",
            "smoke",
            "--output_dir",
            str(out),
            "--card_schedule",
            "true",
            "--num_train_epochs",
            "1",
            "--merge",
            "false",
            "--eval_strategy",
            "no",
            "--save_steps",
            "100",
            "--per_device_train_batch_size",
            "4",
        ]
    )
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    planned = 142  # ceil(565 dialogues / batch 4) // accumulation 1, as transformers 4.35 planned under TRL 0.7.x
    assert state["max_steps"] == planned
    assert 0 < state["global_step"] < planned  # the packed rows ran out first, as at the card's step 272 of 406
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert lrs[-1] > 0.1 * max(lrs)  # the cosine had not come down to 0
    said = f"cosine planned over {planned} steps (transformers 4.35's len(dataloader) // 1 for 565 dialogues in batches"
    assert said in capsys.readouterr().out
