"""QLoRA training in the smoke profile: 4-bit layers, LoRA-only gradients, falling loss, reload, merge, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from utils import REPO_ROOT
from utils import sft
from utils.hardware import choose_profile

RECIPE = str(REPO_ROOT / "configs" / "sft_qlora.yaml")


def smoke_args(output_dir, *extra):
    argv = ["--config", RECIPE, "--output_dir", str(output_dir), *extra]
    script_args, training_args, model_args, _ = sft.parse(argv)
    profile = choose_profile("smoke", verbose=False)
    training_args = sft.apply_profile(profile, script_args, training_args, model_args, sft.explicit_fields(argv))
    sft.validate(script_args, training_args, model_args)
    return profile, script_args, training_args, model_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    profile, script_args, training_args, model_args = smoke_args(out, "--max_steps", "30", "--save_steps", "10")
    trainer = sft.train(script_args, training_args, model_args, profile)
    return trainer, model_args, out


def test_recipe_matches_the_handbook_qlora_config():
    script_args, training_args, model_args, run_args = sft.parse(["--config", RECIPE])
    assert (model_args.load_in_4bit, model_args.bnb_4bit_quant_type) == (True, "nf4")
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 16, 0.05)
    assert model_args.lora_target_modules == list(sft.MISTRAL_LINEAR_MODULES)
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


@pytest.mark.parametrize("name", ["gpu-16gb", "gpu-24gb", "gpu-40gb"])
def test_gpu_profiles_keep_eight_sequences_per_step(name):
    settings = sft.PROFILE_TRAINING[name]
    assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] == 8


def test_cli_overrides_beat_the_profile(tmp_path):
    _, _, training_args, _ = smoke_args(tmp_path, "--max_length", "128", "--learning_rate", "1e-3")
    assert training_args.max_length == 128 and training_args.learning_rate == 1e-3
    assert training_args.per_device_train_batch_size == 2  # from the smoke profile


@pytest.mark.parametrize("extra, message", [
    (["--lora_target_modules", "q_proj", "qkv_proj"], "error: unknown LoRA target module(s) qkv_proj; "),
    (["--max_length", "0"], "error: max_length must be a positive number, got 0"),
    (["--per_device_train_batch_size", "-1"], "error: per_device_train_batch_size must be a positive number, got -1"),
    (["--dataset_name", "/no/such/folder"], "error: dataset /no/such/folder not found: run notebook 01"),
])
def test_bad_configuration_fails_in_one_line(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("weights must not load"))
    code = sft.main(["--config", RECIPE, "--profile", "smoke", "--output_dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message)


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
    checks = sft.label_checks(trained[0])
    assert checks["eos_tokens"] > 0 and checks["eos_tokens_in_loss"] == checks["eos_tokens"]
    assert checks["pad_token"] == "<unk>" and checks["loss_token_share"] > 0.9


def test_outputs_on_disk(trained):
    _, _, out = trained
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "chat_template.jinja").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30 and sum("loss" in h for h in state["log_history"]) == 30
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-30"]  # save_total_limit 1


def _logits(model, tokenizer):
    inputs = tokenizer("<|user|>\nHow do I keep basil alive?</s>\n<|assistant|>\n", return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_adapter_reloads_with_the_same_logits(trained):
    trainer, model_args, out = trained
    trainer.model.eval()
    before = _logits(trainer.model, trainer.processing_class)
    base = sft.load_model(model_args, sft.bnb_config(model_args))
    reloaded = sft.load_adapter(base, out / "adapter").eval()
    assert reloaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16
    after = _logits(reloaded, trainer.processing_class)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    assert not torch.allclose(before, _logits(sft.load_model(model_args, sft.bnb_config(model_args)),
                                              trainer.processing_class), atol=1e-3)  # the adapter matters


def test_merged_model_matches_base_plus_adapter(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, model_args, out = trained
    merged_dir = sft.merge_adapter(model_args, out / "adapter", out / "merged", "bfloat16")
    assert (merged_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    unmerged = PeftModel.from_pretrained(sft.load_model(replace(model_args, dtype="bfloat16")), str(out / "adapter"))
    a, b = _logits(unmerged.eval(), trainer.processing_class), _logits(merged.eval(), trainer.processing_class)
    assert (a - b).abs().max() / a.abs().max() < 2e-2


def _run(out, extra=()):
    cmd = [sys.executable, "-m", "utils.sft", "--config", RECIPE, "--profile", "smoke", "--output_dir", str(out),
           "--max_steps", "12", "--save_steps", "4", "--merge", "false", *extra]
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
    assert (step, pytest.approx(loss, abs=1e-4)) == _final(straight)
