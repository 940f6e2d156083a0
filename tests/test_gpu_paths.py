"""Failures only a GPU shows, caught on the CPU by the invariant behind each: a dtype, an import, a device map."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from utils import REPO_ROOT, sft
from utils.hardware import shape

RECIPE = str(REPO_ROOT / "configs" / "sft_qlora.yaml")
SMOKE = ["--config", RECIPE, "--profile", "smoke", "--eval_strategy", "no", "--merge", "false"]


def _adapter_dtypes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as tensors:
        return {tensors.get_tensor(name).dtype for name in tensors.keys()}, len(list(tensors.keys()))  # noqa: SIM118


# --- 1. a T4's fp16: trainable weights stay float32 ------------------------------------------------------------------
def test_under_fp16_the_trainable_weights_are_float32(tmp_path):
    """TRL casts a quantized model's LoRA weights to bfloat16; CUDA's fp16 gradient scaler then fails at the first
    optimizer step ("_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16'). The command
    line (and notebooks 02/03, which build their trainer the same way) must keep them float32 under fp16."""
    out = tmp_path / "fp16"
    argv = [*SMOKE, "--output_dir", str(out), "--fp16", "true", "--bf16", "false", "--max_steps", "1"]
    assert sft.cli(argv) == 0
    dtypes, count = _adapter_dtypes(out / "checkpoint-1")
    assert count == 56 and dtypes == {torch.float32}
    assert _adapter_dtypes(out / "adapter")[0] == {torch.float32}


def test_the_trainer_keeps_fp32_and_leaves_bf16_as_trl_makes_it(tmp_path):
    for precision, expected in ((["--fp16", "true", "--bf16", "false"], torch.float32), ([], torch.bfloat16)):
        settings = sft.resolve([*SMOKE, "--output_dir", str(tmp_path / "x"), *precision])
        trainer = sft.trainer_for(settings.build())
        trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
        assert trainable == {expected}, precision


# --- 2. Kaggle's 2 x T4: nothing before notebook_launcher initialises CUDA ---------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_what_notebook_03_imports_before_the_launcher_leaves_bitsandbytes_out():
    """bitsandbytes calls torch.cuda.get_device_capability when imported (CUDA initialised); TRL and transformers'
    trainer import it. Notebook 03's cells before the launcher use only these modules, and read the recipe in a
    child process."""
    result = _python(
        "import sys, os, torch\n"
        "from utils import card_era, curves, plan, scaling, sft\n"
        "from utils.hardware import choose_profile, launcher_problems\n"
        "choose_profile('auto')\n"
        "scaling.plot_full_memory()\n"
        "plan.plan_in_child(['--config', 'configs/sft_full.yaml'], gpu='16xa100-80gb')\n"
        "print('bitsandbytes' in sys.modules, torch.cuda.is_initialized(), os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'],"
        " launcher_problems())\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False False 1 []"


def test_launcher_problems_name_what_would_stop_the_fork():
    result = _python(
        "import os; os.environ.pop('PYTORCH_NVML_BASED_CUDA_CHECK', None)\n"
        "import bitsandbytes\n"
        "from utils.hardware import launcher_problems\n"
        "os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'] = '0'\n"
        "print(launcher_problems())\n"
        "from accelerate import notebook_launcher\n"
        "try:\n"
        "    notebook_launcher(print, num_processes=2)\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', str(exc).splitlines()[0])\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    problems, refused = result.stdout.strip().splitlines()[-2:]
    assert "bitsandbytes is imported" in problems and "PYTORCH_NVML_BASED_CUDA_CHECK is not 1" in problems
    assert refused == (
        "refused: Could not start distributed process. Libraries known to initialize device upon import have been "
        "imported already. Please keep these imports inside your training function to try and help with this:"
    )


# --- 3. sampling in the profile's dtype -----------------------------------------------------------------------------
def test_sampling_on_a_t4_is_fp16_even_where_bf16_is_emulated(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation and says True on a T4; the profile knows better."""
    from utils.hardware import choose_profile
    from utils.sampling import sampling_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    t4 = choose_profile("auto", shape("t4").hardware(), verbose=False)
    assert sampling_dtype(t4) == torch.float16
    assert sampling_dtype(choose_profile("auto", shape("l4").hardware(), verbose=False)) == torch.bfloat16
    assert sampling_dtype(choose_profile("smoke", verbose=False)) == torch.float32
    source = (REPO_ROOT / "utils" / "sampling.py").read_text()
    nb = (REPO_ROOT / "notebooks" / "05_pirate_prompt_sampling.ipynb").read_text()
    assert "is_bf16_supported()" not in source.replace("``torch.cuda.is_bf16_supported()``", "")
    assert "is_bf16_supported" not in nb


# --- 4. merging on a 16 GB GPU with 12.7 GB of RAM ------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "run"
    assert sft.cli([*SMOKE, "--output_dir", str(out), "--max_steps", "2"]) == 0
    return out / "adapter"


def test_the_old_merge_fails_where_the_model_is_partly_offloaded(adapter, tmp_path):
    """What happened on a T4: device_map="auto" offloads part of the 13.5 GiB fp16 base, and moving a dispatched
    model (``merged.to(dtype)``) raises. Forced here with an offloading device map."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.assets import TINY_MODEL_DIR

    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    base = AutoModelForCausalLM.from_pretrained(
        TINY_MODEL_DIR, dtype=torch.bfloat16, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    with pytest.raises((RuntimeError, NotImplementedError), match="offloaded|meta tensor"):
        # the old merge_adapter's steps; a GPU says "You can't move a model that has some modules offloaded"
        PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(torch.float16)


def test_merge_adapter_never_holds_the_whole_model(adapter, tmp_path, monkeypatch):
    """The merge reads the base tensor by tensor and writes small shards: no model object, no device map, and the
    same weights as peft's merge_and_unload (to one bf16 rounding: peft adds in bf16, we round once)."""
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils import model as model_module
    from utils.assets import TINY_MODEL_DIR

    expected = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.bfloat16), str(adapter)
        )
        .merge_and_unload()
        .state_dict()
    )
    monkeypatch.setattr(model_module, "MAX_SHARD_BYTES", 2**20)  # 1 MiB shards: several, with an index
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a whole model")
    )
    out = model_module.merge_adapter(str(TINY_MODEL_DIR), adapter, tmp_path / "merged", "bfloat16")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(expected)
    monkeypatch.undo()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(merged[name].float(), tensor.float(), rtol=1e-2, atol=1e-3), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".merged.tmp-*"))  # the temporary folder is gone


def test_merge_writes_float16_for_a_t4(adapter, tmp_path):
    from utils.assets import TINY_MODEL_DIR
    from utils.model import merge_adapter

    out = merge_adapter(str(TINY_MODEL_DIR), adapter, tmp_path / "merged16", "float16")
    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        assert {tensors.get_tensor(n).dtype for n in tensors.keys()} == {torch.float16}  # noqa: SIM118


# --- 6. the throughput benchmark builds the 7B in bf16 and checks fp16 -------------------------------------------
def test_the_benchmark_builds_in_bf16_and_has_a_t4_precision_variant(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from train_throughput import gpu_variants, save_random_model

    from tools.tiny_base import TINY_MISTRAL
    from utils.hardware import choose_profile
    from utils.recipe import resolve

    folder = save_random_model(dict(TINY_MISTRAL), tmp_path / "m", "cpu")
    with safe_open(str(folder / "model.safetensors"), "pt") as tensors:
        assert {tensors.get_tensor(n).dtype for n in tensors.keys()} == {torch.bfloat16}  # noqa: SIM118
    fp16 = next(v for v in gpu_variants("gpu-80gb") if "fp16" in v.name)
    h100 = shape("h100").hardware()
    values = resolve(["--config", RECIPE, *fp16.argv], choose_profile(fp16.profile, h100, verbose=False), h100).values
    assert (values["fp16"], values["bf16"], values["dtype"], values["attn_implementation"]) == (
        True,
        False,
        "float16",
        "sdpa",
    )
