"""The model side of a run: load the base (4-bit or 16-bit), put a saved adapter on it, merge the adapter into the
16-bit weights and check the merge. The 4-bit and LoRA configurations come from TRL's own builders."""

import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from utils import ConfigError, process_alive, share_like_other_files, temporary_folder
from utils.assets import TINY_MODEL_DIR, ensure_tiny_model

MAX_SHARD_BYTES = 2 * 2**30  # merged shards of at most 2 GiB: saving never needs more host memory than one shard


def load_model(model_args, quantization=None, device_map: str | dict | None = None):
    """The base model, 4-bit when ``quantization`` is given (then on this process's GPU when there is one)."""
    if Path(model_args.model_name_or_path) == TINY_MODEL_DIR:
        ensure_tiny_model()
    if device_map is None and quantization is not None and torch.cuda.is_available():
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}  # 4-bit weights live on this process's GPU
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=getattr(torch, model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision,
        quantization_config=quantization,
        device_map=device_map,
    )
    keep_standard_4bit_layout(model)
    return model


def keep_standard_4bit_layout(model) -> None:
    """Keep every 4-bit layer in bitsandbytes' standard layout (call it before any forward). On CPUs with AVX512-BF16,
    bitsandbytes 0.50 repacks a weight at its first no-grad eval forward into a layout that crashes on widths not
    divisible by 64, computes LoRA's gradients wrong once training resumes and saves its scales transposed."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit layer can exist (and importing it touches CUDA)
    for layer in model.modules() if bnb else ():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def load_adapter(base, adapter_dir: str | Path):
    """``base`` plus the saved LoRA adapter, kept in the dtype it was saved in (bf16 where TRL cast it, fp32 under
    fp16 training), so the reloaded model computes exactly as the trained one did."""
    from peft import PeftModel  # imported here: importing peft imports bitsandbytes, which initialises CUDA

    model = PeftModel.from_pretrained(base, str(adapter_dir))
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as tensors:
        saved = tensors.get_tensor(next(iter(tensors.keys()))).dtype
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(saved)
    return model


def merge_dtype(model_args) -> str:
    """The 16-bit dtype to merge into: float16 where training computed in fp16 (T4, V100), else bfloat16."""
    return "float16" if model_args.dtype == "float16" else "bfloat16"


def parameter_count(param) -> int:
    """How many parameters ``param`` holds: a 4-bit weight's by its ``quant_state.shape`` (``numel()`` is half)."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()


# --- merging ---------------------------------------------------------------------------------------------------------
def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str, revision: str = "main") -> Path:
    """``base`` + the adapter's ``s·B·A`` (as peft's ``merge_and_unload()``) as ``dtype`` safetensors, config and
    tokenizer, whole or not at all; one tensor at a time, so no GPU and a T4's 12.7 GB of RAM merge a 7B (14.5 GB)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise ConfigError(
            f"{adapter_dir}: only plain LoRA adapters are merged tensor by tensor ({', '.join(unsupported)} set); "
            "merge with peft's merge_and_unload() on a machine with memory for the whole 16-bit model"
        )
    scale, pairs = _lora(adapter_dir)
    files = _tensor_files(base_weight_files(base, revision))
    found = len(set(pairs) & set(files))
    if found != len(pairs) or not found:
        target = ", ".join(sorted(config.get("target_modules") or []))
        raise ConfigError(f"{adapter_dir}: {len(pairs)} adapted layers ({target}), {found} found in {base}'s weights")
    with _written_whole(out_dir) as tmp:
        shards, shard, size = [], {}, 0  # shards: (tensor names, bytes) of each shard written
        for i, name in enumerate(files):
            weight = _read(files[name], name)
            if name in pairs:
                a, b = pairs[name]
                weight = weight.float() + scale * (b.float() @ a.float())
            shard[name] = weight.to(getattr(torch, dtype)) if weight.is_floating_point() else weight
            size += shard[name].nbytes
            if size >= MAX_SHARD_BYTES or i == len(files) - 1:
                save_file(shard, str(tmp / f"shard-{len(shards)}"), metadata={"format": "pt"})
                shards.append((list(shard), size))
                shard, size = {}, 0
        n = len(shards)
        finals = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
        for i, final in enumerate(finals):
            (tmp / f"shard-{i}").rename(tmp / final)
        if n > 1:
            weight_map = {tensor: final for (names, _), final in zip(shards, finals, strict=True) for tensor in names}
            index = {"metadata": {"total_size": sum(s for _, s in shards)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        AutoConfig.from_pretrained(base, revision=revision, dtype=dtype).save_pretrained(tmp)  # the merged dtype
        with contextlib.suppress(OSError):  # a base without generation_config.json
            GenerationConfig.from_pretrained(base, revision=revision).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    return out_dir


def merged_is_whole(folder: str | Path) -> bool:
    """Whether ``folder`` holds a merged model's config and every weight file its index names (a part copy does not)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return all((folder / name).is_file() for name in ("config.json", *names))


def merge_fits_in_memory(base: str, revision: str = "main") -> bool:
    """Whether peft can merge in this machine's free memory: the 16-bit base loaded in float32 (twice its files'
    size) and its 16-bit copy to save (once more). A 7B needs ~44 GB; the tiny model under 30 MB."""
    need = 3 * sum(f.stat().st_size for f in base_weight_files(base, revision))
    return need < 0.8 * psutil.virtual_memory().available


def save_merged(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a merged model (safetensors shards of at most 2 GiB) and its tokenizer into ``out_dir``, whole or not."""
    with _written_whole(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_BYTES)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


@contextlib.contextmanager
def _written_whole(out_dir: Path):
    """A temporary sibling to write into that replaces ``out_dir`` (a merge of ours: the caller checked the run folder)
    if the block ends well, else is removed; what killed merges left (a 7B's is 14.5 GB) goes first."""
    for killed in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = killed.name.removeprefix(f".{out_dir.name}.tmp-").split("-")[0]
        if killed.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(killed, ignore_errors=True)
    tmp = temporary_folder(out_dir.parent, f".{out_dir.name}.tmp-{os.getpid()}-")
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        share_like_other_files(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _lora(adapter_dir: Path) -> tuple[float, dict]:
    """peft's scale of B·A (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) and the adapter's (A, B) pairs by the
    base weight they adapt: ``base_model.model.X.lora_A.weight`` and ``….lora_B.weight`` adapt ``X.weight``."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    parts: dict[str, dict] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                parts.setdefault(key.removeprefix("base_model.model.").replace(f".{part}", ""), {})[part] = tensor
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    return scale, {name: (p["lora_A"], p["lora_B"]) for name, p in parts.items() if len(p) == 2}


def base_weight_files(base: str, revision: str = "main") -> list[Path]:
    """The base model's safetensors files: from its folder, or from the Hub cache (downloaded if missing)."""
    folder = Path(base)
    if not folder.is_dir():
        folder = Path(snapshot_download(base, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    if not (files := sorted(folder.glob("*.safetensors"))):
        raise ConfigError(f"{base} has no safetensors weights to merge into")
    return files


def _tensor_files(files: list[Path]) -> dict[str, Path]:
    """The file that holds each tensor of ``files``, in the files' order."""
    found = {}
    for file in files:
        with safe_open(str(file), "pt") as tensors:
            found.update(dict.fromkeys(tensors.keys(), file))
    return found


def _read(file: Path, name: str):
    with safe_open(str(file), "pt") as tensors:
        return tensors.get_tensor(name)


# --- checking a merge ------------------------------------------------------------------------------------------------
@dataclass
class MergeCheck:
    """What ``check_merge`` found: counts, the largest differences, and the problems (none when right)."""

    adapted: int = 0  # tensors that should hold W + s·B·A
    unchanged: int = 0  # the others, which should equal the base's
    pairs: int = 0  # LoRA (A, B) pairs in the adapter
    scale: float = 0.0
    largest_ulps: float = 0.0  # merged vs round16(W + s·B·A), in units in the last place
    probe_share: float = 0.0  # the largest probe difference as a share of its rounding bound (at most 1)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """What a learner reads: each property and whether it held."""
        return [
            f"{self.adapted} adapted weights: each equals W + {self.scale:g}·B·A computed in float32 and rounded once, "
            f"within {self.largest_ulps:g} unit(s) in the last place (allowed: 1)",
            f"{self.pairs} LoRA pairs in the adapter, each used exactly once; {self.unchanged} other tensors "
            "bit-identical to the base's",
            f"probe: merged·x against W·x + {self.scale:g}·B·(A·x) on a random x, per adapted layer: at most "
            f"{self.probe_share:.2f} of the bound that rounding to 16 bits allows",
            *(f"PROBLEM: {p}" for p in self.problems[:5]),
        ]


def check_merge(base: str, adapter_dir: str | Path, merged_dir: str | Path, revision: str = "main") -> MergeCheck:
    """Check a merge one tensor at a time (so a 7B's in little memory) for what ``MergeCheck.lines`` says: adapted
    weights within one unit in the last place, every pair used once, other tensors bit-identical, the probe bounded."""
    scale, pairs = _lora(Path(adapter_dir))
    result = MergeCheck(pairs=len(pairs), scale=scale)
    base_files = _tensor_files(base_weight_files(base, revision))
    merged_files = _tensor_files(sorted(Path(merged_dir).glob("*.safetensors")))
    for name in sorted(set(base_files) ^ set(merged_files)):
        result.problems.append(f"{name} is in the {'base' if name in base_files else 'merged model'} only")
    for name in sorted(set(pairs) - set(merged_files)):
        result.problems.append(f"the adapter's pair for {name} has no weight in the merged model")
    generator = torch.Generator().manual_seed(0)
    for name in sorted(set(base_files) & set(merged_files)):
        weight, merged = _read(base_files[name], name), _read(merged_files[name], name)
        if name not in pairs:
            result.unchanged += 1
            if not torch.equal(merged, weight.to(merged.dtype)):
                result.problems.append(f"{name} is not the base's tensor")
            continue
        result.adapted += 1
        a, b, w = (t.float() for t in (*pairs[name], weight))
        expected = (w + scale * (b @ a)).to(merged.dtype)
        ulps = ((merged.float() - expected.float()).abs() / _ulp(expected)).max().item()
        result.largest_ulps = max(result.largest_ulps, ulps)
        if ulps > 1:
            result.problems.append(f"{name}: {ulps:.0f} units in the last place from W + s·B·A")
        x = torch.randn(w.shape[1], 4, generator=generator)
        probe = merged.float() @ x - (w @ x + scale * (b @ (a @ x)))
        bound = _ulp(merged) @ x.abs() + 1e-5 * (w.abs() @ x.abs() + scale * (b.abs() @ (a.abs() @ x.abs())))
        share = (probe.abs() / bound).max().item()
        result.probe_share = max(result.probe_share, share)
        if share > 1:
            result.problems.append(f"{name}: the probe is {share:.1f}x what rounding allows")
    return result


def _ulp(tensor):
    """The spacing of ``tensor``'s dtype at each of its values (a unit in the last place), as float32."""
    magnitude = tensor.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude).float()
