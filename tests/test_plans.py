"""`--gpu SHAPE --plan`: what a run would do on every GPU the collection plans for, and where each value came from."""

import json
import subprocess
import sys

import pytest

from tools.gpu_plans import markdown_table
from utils import REPO_ROOT, hardware, sft
from utils.hardware import SHAPES, shape
from utils.plan import shape_plans

RECIPE = "configs/sft_qlora.yaml"
# shape -> profile, compute dtype, bf16, fp16, attention, checkpoint every, batch x accumulation x GPUs, trainable
EXPECTED = {
    "t4": ("gpu-16gb", "float16", False, True, "sdpa", 1, (4, 2, 1), "float32"),
    "2xt4": ("gpu-16gb", "float16", False, True, "sdpa", 1, (4, 2, 2), "float32"),
    "l4": ("gpu-24gb", "bfloat16", True, False, "flex_attention", 1, (4, 2, 1), "bfloat16"),
    "a10g": ("gpu-24gb", "bfloat16", True, False, "flex_attention", 1, (4, 2, 1), "bfloat16"),
    "rtx4090": ("gpu-24gb", "bfloat16", True, False, "flex_attention", 1, (4, 2, 1), "bfloat16"),
    "a100-40gb": ("gpu-40gb", "bfloat16", True, False, "flex_attention", 2, (4, 2, 1), "bfloat16"),
    "a100-80gb": ("gpu-80gb", "bfloat16", True, False, "flex_attention", 0, (4, 2, 1), "bfloat16"),
    "h100": ("gpu-80gb", "bfloat16", True, False, "flex_attention", 0, (4, 2, 1), "bfloat16"),
    "h200": ("gpu-80gb", "bfloat16", True, False, "flex_attention", 0, (4, 2, 1), "bfloat16"),
}


@pytest.fixture(scope="module")
def plans():
    return shape_plans(RECIPE)


def test_every_shape_is_planned(plans):
    assert list(plans) == list(SHAPES) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_shapes_choices(name, plans):
    profile, dtype, bf16, fp16, attn, every, batch, trainable = EXPECTED[name]
    p = plans[name]
    s = p["settings"]
    assert p["profile"] == profile
    assert (s["dtype"]["value"], s["bf16"]["value"], s["fp16"]["value"]) == (dtype, bf16, fp16)
    assert s["attn_implementation"]["value"] == attn
    assert s["activation_checkpointing"]["value"] is (every > 0)
    kwargs = s["activation_checkpointing_kwargs"]["value"]
    assert kwargs.get("every_n_layers", 1 if every else 0) == every and kwargs["use_reentrant"] is False
    per, acc = s["per_device_train_batch_size"]["value"], s["gradient_accumulation_steps"]["value"]
    assert (per, acc, p["world_size"]) == batch
    assert p["parts"]["trainable weights"].startswith(trainable)
    assert p["parts"]["4-bit compute"] == dtype and p["parts"]["sampling"] == dtype
    assert p["parts"]["merge"] == ("float16" if dtype == "float16" else "bfloat16")
    for field in ("dtype", "bf16", "fp16", "attn_implementation", "activation_checkpointing"):
        assert s[field]["from"] == "profile", field  # the recipe leaves these to the GPU
    assert s["learning_rate"]["from"] == "recipe" and s["per_device_train_batch_size"]["from"] == "recipe"
    e = p["estimates"]
    assert e["fits"] is True and e["memory_gib"] <= e["gpu_memory_gib"] == shape(name).memory_gib
    assert e["epoch_hours"] > 0 and e["epoch_basis"].startswith("estimate: the H200's")


def test_the_epoch_estimate_names_its_assumptions(plans):
    """The estimate scales the H200's speed by peak TFLOPS and GPU count only: 2 x T4 is exactly half a T4's time and
    an H100 gets the H200's time. Where the numbers say so, the printed basis says it is an assumption."""
    hours = {name: p["estimates"]["epoch_hours"] for name, p in plans.items()}
    basis = {name: p["estimates"]["epoch_basis"] for name, p in plans.items()}
    assert hours["2xt4"] == pytest.approx(hours["t4"] / 2, abs=0.05)
    assert "perfect scaling over 2 GPUs" in basis["2xt4"] and "perfect scaling" not in basis["t4"]
    assert hours["h100"] == hours["h200"] and hardware.peak_tflops("H100") == hardware.peak_tflops("H200")
    assert "its estimate is the H200's measurement" in basis["h100"] and "H200's measurement" not in basis["h200"]
    assert all("assumes speed in proportion to peak TFLOPS" in b for b in basis.values())
    result = _plan(["--config", RECIPE, "--gpu", "8xh100"])
    assert result.returncode == 0, result.stderr
    assert "  assumes speed in proportion to peak TFLOPS alone" in result.stdout
    assert "perfect scaling over 8 GPUs (8 x one GPU's speed)" in result.stdout


def test_the_docs_table_is_the_codes(plans):
    assert markdown_table(plans) in (REPO_ROOT / "docs" / "gpu_plans.md").read_text()


def test_a_value_in_the_recipe_file_is_the_users(tmp_path):
    """Today's bug: a batch edited in the YAML was silently undone on every GPU run. The profile fills only what
    the user left out, and the command line beats the file."""
    recipe = (
        (REPO_ROOT / RECIPE).read_text().replace("per_device_train_batch_size: 4", "per_device_train_batch_size: 1")
    )
    mine = tmp_path / "mine.yaml"
    mine.write_text(recipe + "attn_implementation: sdpa\n")
    from utils.hardware import choose_profile
    from utils.recipe import resolve

    hw = shape("h100").hardware()
    settings = resolve(["--config", str(mine)], choose_profile("auto", hw, verbose=False), hw)
    assert (settings.values["per_device_train_batch_size"], settings.sources["per_device_train_batch_size"]) == (
        1,
        "recipe",
    )
    assert (settings.values["attn_implementation"], settings.sources["attn_implementation"]) == ("sdpa", "recipe")
    assert settings.values["activation_checkpointing"] is False  # what the recipe left out is still the profile's
    cli = resolve(
        ["--config", str(mine), "--per_device_train_batch_size", "2"], choose_profile("auto", hw, verbose=False), hw
    )
    assert (cli.values["per_device_train_batch_size"], cli.sources["per_device_train_batch_size"]) == (
        2,
        "command line",
    )


def test_bf16_written_for_a_t4_is_one_line(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text((REPO_ROOT / RECIPE).read_text() + "bf16: true\n")
    result = _plan(["--config", str(mine), "--gpu", "t4"])
    assert result.returncode == 2 and result.stdout.count("\n") <= 2  # the profile line, nothing heavier
    assert result.stderr == (
        "error: bf16=True (from the recipe) needs a GPU with bfloat16 (compute capability 8.0+); this Tesla T4 has "
        "none: use fp16 / float16, or leave it to the profile\n"
    )


def test_the_command_line_plan_and_its_json(tmp_path):
    out = tmp_path / "plan.json"
    result = _plan(["--config", RECIPE, "--gpu", "t4", "--learning_rate", "1e-4", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    assert "Plan for 1x Tesla T4 (15 GiB, sm 7.5, bf16=no); platform colab; Hub reachable: profile gpu-16gb" in (
        result.stdout
    )
    assert "  learning_rate" in result.stdout and "command line" in result.stdout
    assert "trainable weights  float32 (with_additions keeps them so under fp16)" in result.stdout
    assert "One epoch of ultrachat_200k (~286M tokens): ~" in result.stdout
    data = json.loads(out.read_text())
    assert data["profile"] == "gpu-16gb"
    assert data["settings"]["learning_rate"] == {"value": 1e-4, "from": "command line"}
    assert data["settings"]["fp16"] == {"value": True, "from": "profile"}
    assert data["settings"]["lora_r"] == {"value": 16, "from": "recipe"}
    assert data["settings"]["seed"]["from"] == "recipe" and data["settings"]["weight_decay"]["from"] == "default"
    assert set(data["settings"]["fp16"]) == {"value", "from"}


def test_a_token_is_never_printed_or_written(tmp_path):
    out = tmp_path / "plan.json"
    result = _plan(["--config", RECIPE, "--gpu", "l4", "--hub_token", "hf_SECRETsecret", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    assert "hf_SECRET" not in result.stdout + result.stderr + out.read_text()
    assert json.loads(out.read_text())["settings"]["hub_token"] == {"value": "<set>", "from": "command line"}


def test_an_unknown_gpu_is_one_line():
    result = _plan(["--config", RECIPE, "--gpu", "gtx1080"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown GPU 'gtx1080'; choose one of: t4, 2xt4, l4, a10g, rtx4090,")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu", "99999999999999999999xh100"], "GPU '99999999999999999999xh100': the count must be 1 to 1024"),
        (["--gpu", "1025xh100"], "GPU '1025xh100': the count must be 1 to 1024"),
        (["--gpu", ""], "--gpu needs a value"),
        (["--gpu="], "--gpu needs a value"),
    ],
)
def test_a_gpu_count_out_of_range_or_an_empty_gpu_is_one_line(argv, message, capsys):
    assert sft.cli(["--config", RECIPE, *argv, "--plan"]) == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")


def test_the_hardware_command_refuses_an_empty_gpu(capsys):
    assert hardware.main(["--gpu", ""]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: unknown GPU ''; choose one of: t4, ") and err.count("\n") == 1


def test_the_hardware_command_plans_a_shape():
    result = subprocess.run(
        [sys.executable, "-m", "utils.hardware", "--gpu", "a100-40gb"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("Profile: gpu-40gb — 39 GiB GPU fits 40 GB class")
    assert "  activation_checkpointing_kwargs {'every_n_layers': 2}" in result.stdout


def _plan(argv):
    return subprocess.run(
        [sys.executable, "-m", "utils.sft", *argv, "--plan"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
