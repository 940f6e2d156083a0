"""The merge check tests the property, W + s·B·A rounded once, whatever the run length: a right merge of a small
adapter passes, a merge with the scale doubled or the product transposed fails."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils.assets import ensure_tiny_model, load_tokenizer
from utils.model import check_merge, merge_adapter


def _adapter(folder, std: float, seed: int = 0):
    """A LoRA adapter on the tiny base (r 16, alpha 16, every linear layer) with random A and B of ``std``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param) * std
    model.save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)  # as utils.sft saves an adapter: the merge copies it
    return folder


def _logit_distances(merged_dir, adapter_dir):
    """(merged vs 16-bit base + adapter, merged vs base alone): the largest logit differences on one prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 523, 28766, 1838, 28766, 28767, 13, 3195, 349, 264, 446, 1657, 28804]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)(ids).logits.float()
        base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.bfloat16)
        peft = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        unmerged = peft(ids).logits.float()
        with peft.disable_adapter():
            alone = peft(ids).logits.float()
    return (merged - unmerged).abs().max().item(), (merged - alone).abs().max().item()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small adapter, merged: the size at which comparing logits cannot tell the merge from the base."""
    folder = tmp_path_factory.mktemp("small")
    adapter = _adapter(folder / "adapter", std=0.004)
    merged = merge_adapter(str(ensure_tiny_model()), adapter, folder / "merged", "bfloat16")
    return adapter, merged


def test_a_small_adapter_fails_the_old_logit_criterion(small):
    to_unmerged, to_base = _logit_distances(small[1], small[0])
    assert not to_unmerged < to_base / 2  # what notebook 02 asserted before: not a property of the merge


def test_a_right_merge_passes(small):
    result = check_merge(str(ensure_tiny_model()), *small)
    assert result.ok, result.problems
    assert (result.adapted, result.pairs, result.unchanged, result.scale) == (28, 28, 11, 1.0)
    assert result.largest_ulps <= 1 and result.probe_share <= 1
    assert result.lines()[0].startswith("28 adapted weights: each equals W + 1·B·A computed in float32")


def test_a_zero_adapter_passes(tmp_path):
    adapter = _adapter(tmp_path / "adapter", std=0.0)  # one warm-up step at learning rate 0 leaves B = 0
    merged = merge_adapter(str(ensure_tiny_model()), adapter, tmp_path / "merged", "bfloat16")
    assert check_merge(str(ensure_tiny_model()), adapter, merged).ok


def _broken(small, tmp_path, change):
    adapter, merged = small
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    change(tensors, load_file(str(adapter / "adapter_model.safetensors")))
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return check_merge(str(ensure_tiny_model()), adapter, broken)


def _base(name):
    return load_file(str(ensure_tiny_model() / "model.safetensors"))[name].float()


def _lora(adapter, name):
    key = "base_model.model." + name.removesuffix(".weight")
    return adapter[f"{key}.lora_A.weight"].float(), adapter[f"{key}.lora_B.weight"].float()


def test_a_doubled_scale_fails(small, tmp_path):
    def doubled(tensors, adapter):
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            a, b = _lora(adapter, name)
            tensors[name] = (_base(name) + 2.0 * b @ a).to(torch.bfloat16)

    result = _broken(small, tmp_path, doubled)
    assert not result.ok and result.largest_ulps > 1000  # by many units where W is near 0


def test_a_transposed_product_fails(small, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"  # square: (B·A)^T has its shape

    def transposed(tensors, adapter):
        a, b = _lora(adapter, name)
        tensors[name] = (_base(name) + (b @ a).T).to(torch.bfloat16)

    result = _broken(small, tmp_path, transposed)
    assert not result.ok and result.problems[0].startswith(name)


def test_an_unused_or_missing_pair_fails(small, tmp_path):
    adapter, merged = small
    extra = tmp_path / "adapter"
    shutil.copytree(adapter, extra)
    tensors = load_file(str(extra / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mlp.extra_proj.lora_A.weight"] = torch.zeros(16, 64)
    tensors["base_model.model.model.layers.0.mlp.extra_proj.lora_B.weight"] = torch.zeros(64, 16)
    save_file(tensors, str(extra / "adapter_model.safetensors"))
    result = check_merge(str(ensure_tiny_model()), extra, merged)
    assert not result.ok and "model.layers.0.mlp.extra_proj.weight has no weight" in result.problems[0]
    assert json.loads((extra / "adapter_config.json").read_text())["r"] == 16
