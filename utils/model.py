"""The model side of a run: load the base (4-bit or 16-bit), put a saved adapter on it, merge the adapter into the
16-bit weights, count parameters.

The 4-bit and LoRA configurations come from TRL's own builders (``get_quantization_config``, ``get_peft_config``)
on the command line; notebook 02 builds the same objects in view and passes them in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import ConfigError, process_alive, share_like_other_files, temporary_folder

MAX_SHARD_BYTES = 2 * 2**30  # merged shards of at most 2 GiB: saving never needs more host memory than one shard


def load_model(model_args, quantization=None, device_map: str | dict | None = None):
    """The base model, 4-bit when ``quantization`` is given (then on this process's GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils.assets import TINY_MODEL_DIR, ensure_tiny_model

    if Path(model_args.model_name_or_path) == TINY_MODEL_DIR:
        ensure_tiny_model()
    kwargs: dict[str, Any] = dict(
        dtype=getattr(torch, model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision,
    )
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif torch.cuda.is_available() and quantization is not None:  # 4-bit weights live on this process's GPU
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    keep_standard_4bit_layout(model)
    return model


def keep_standard_4bit_layout(model) -> int:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout on the CPU; return how many there are.

    On a CPU with AVX512-BF16 (AMD Zen 4/5, Intel Sapphire Rapids and newer) bitsandbytes 0.50 sets
    ``Linear4bit.support_avx512bf16_for_cpu`` and, at a layer's first forward in eval mode without gradients (an
    evaluation during training, a merge check, sampling), repacks its weight in place for a faster inference kernel.
    That layout needs input widths divisible by 64 (the tiny model's 224-wide ``down_proj`` crashes), stays when
    training resumes, where ``matmul_4bit`` then computes without autograd (LoRA's gradients after an evaluation
    come out wrong), and saves its scales transposed. Clearing the flag keeps the layout every other CPU and every
    GPU uses, so a run computes the same on all of them. Call it after loading a 4-bit model, before any forward.
    """
    import sys

    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit layer can exist (and importing it touches CUDA)
    if bnb is None:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_adapter(base, adapter_dir: str | Path):
    """``base`` plus the saved LoRA adapter, kept in the dtype it was saved in (bf16 where TRL cast it, fp32 under
    fp16 training), so the reloaded model computes exactly as the trained one did."""
    from peft import PeftModel
    from safetensors import safe_open

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


# --- merging, one tensor at a time ---------------------------------------------------------------------------------
def merge_adapter(base: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str, revision: str = "main") -> Path:
    """Write ``base`` with the LoRA adapter merged in, as ``dtype`` safetensors shards, plus config and tokenizer.

    Each adapted weight becomes ``W + (lora_alpha / r) · B·A``, exactly what peft's ``merge_and_unload()`` computes,
    but read from the base's safetensors files and written one tensor at a time into shards of at most 2 GiB: the
    whole 16-bit model (14.5 GB for Mistral-7B) is never in memory, and no GPU is needed. That is what lets a Colab
    T4 (15 GB of GPU memory, 12.7 GB of RAM) merge a 7B adapter. The output appears whole or not at all.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    scale, target = _lora_scale(adapter_dir)
    pairs = lora_pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    files = base_weight_files(base, revision)
    with _written_whole(out_dir) as tmp:
        shards, shard, size, merged = [], {}, 0, 0
        for file in files:
            with safe_open(str(file), "pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
                    weight = tensors.get_tensor(name)
                    if name in pairs:
                        a, b = pairs[name]
                        weight = weight.float() + scale * (b.float() @ a.float())
                        merged += 1
                    shard[name] = weight.to(getattr(torch, dtype)) if weight.is_floating_point() else weight
                    size += shard[name].numel() * shard[name].element_size()
                    if size >= MAX_SHARD_BYTES:
                        shards.append(_write_shard(tmp, len(shards), shard, save_file))
                        shard, size = {}, 0
        if shard:
            shards.append(_write_shard(tmp, len(shards), shard, save_file))
        if merged != len(pairs) or not merged:
            raise ConfigError(
                f"{adapter_dir}: {len(pairs)} adapted layers ({', '.join(target)}), {merged} found in {base}'s weights"
            )
        _name_shards(tmp, shards)
        _copy_config(base, revision, tmp, dtype)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    return out_dir


def merged_is_whole(folder: str | Path) -> bool:
    """Whether ``folder`` holds a whole merged model: its config and every weight file its index names (or the one
    ``model.safetensors``). ``merge_adapter`` writes it whole or not at all; a folder copied in part is not whole."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return all((folder / name).is_file() for name in names)


def remove_killed_merges(out_dir: Path) -> list[Path]:
    """Remove the temporary folders (``.merged.tmp-PID-*``) that merges killed before their end left beside
    ``out_dir``: a 7B's is 14.5 GB. A folder whose process still runs is left alone. Returns what was removed."""
    removed = []
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{out_dir.name}.tmp-").split("-")[0]
        if tmp.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def merge_fits_in_memory(base: str, revision: str = "main") -> bool:
    """Whether peft can merge in this machine's free memory: the 16-bit base loaded in float32 (twice its files'
    size) and its 16-bit copy to save (once more). A 7B needs ~44 GB; the tiny model under 30 MB."""
    need = 3 * sum(f.stat().st_size for f in base_weight_files(base, revision))
    return need < 0.8 * _available_memory()


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; 0 where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def save_merged(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a merged model (safetensors shards of at most 2 GiB) and its tokenizer into ``out_dir``, whole or not at
    all: into a temporary sibling first, then renamed over an earlier merge this tool wrote."""
    out_dir = Path(out_dir)
    with _written_whole(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_BYTES)
        tokenizer.save_pretrained(tmp)
    return out_dir


@contextlib.contextmanager
def _written_whole(out_dir: Path):
    """A temporary sibling of ``out_dir`` to write a merged model into (what a killed merge left is removed first).
    When the block ends well it replaces ``out_dir`` (a merged folder this tool wrote before: the caller checked the
    run folder), its files readable as the umask allows; on any error it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_killed_merges(out_dir)
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


def _lora_scale(adapter_dir: Path) -> tuple[float, list[str]]:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) and the target modules, for an adapter this merge supports."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise ConfigError(
            f"{adapter_dir}: only plain LoRA adapters are merged tensor by tensor ({', '.join(unsupported)} set); "
            "merge with peft's merge_and_unload() on a machine with memory for the whole 16-bit model"
        )
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r), sorted(config.get("target_modules") or [])


def lora_pairs(adapter: dict) -> dict[str, tuple[Any, Any]]:
    """The adapter's (A, B) matrices by the name of the base weight they adapt: peft saves
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` for
    ``model.layers.0.self_attn.q_proj.weight``."""
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in adapter.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                parts.setdefault(key.removeprefix("base_model.model.").replace(f".{part}", ""), {})[part] = tensor
    return {name: (p["lora_A"], p["lora_B"]) for name, p in parts.items() if len(p) == 2}


def base_weight_files(base: str, revision: str = "main") -> list[Path]:
    """The base model's safetensors files: from its folder, or from the Hub cache (downloaded if missing)."""
    folder = Path(base)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(base, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{base} has no safetensors weights to merge into")
    return files


def _write_shard(folder: Path, index: int, tensors: dict, save_file) -> tuple[Path, list[str], int]:
    path = folder / f"shard-{index:05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def _name_shards(folder: Path, shards: list[tuple[Path, list[str], int]]) -> None:
    """One shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with their index."""
    if len(shards) == 1:
        shards[0][0].rename(folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (path, names, size) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
        total += size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_config(base: str, revision: str, folder: Path, dtype: str) -> None:
    """The base's config (with the merged dtype) and its generation config, when it has one."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base, revision=revision)
    config.dtype = dtype
    config.save_pretrained(folder)
    with contextlib.suppress(OSError):  # a base without generation_config.json
        GenerationConfig.from_pretrained(base, revision=revision).save_pretrained(folder)


# --- checking a merge ------------------------------------------------------------------------------------------------
@dataclass
class MergeCheck:
    """What ``check_merge`` found: counts, the largest differences, and the first problem (None when right)."""

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
    """Check a merged model against the base and the adapter it was made from, tensor by tensor, whatever the run
    length: each adapted weight equals ``round16(W + s·B·A)`` (the sum in float32, rounded once to the merged
    dtype) within one unit in the last place; every LoRA pair of the adapter is used exactly once; every other
    tensor is bit-identical to the base's (in the merged dtype); and, for each adapted layer, a probe on a random
    ``x``: ``merged·x`` differs from ``W·x + s·B·(A·x)`` (another order of the same sums) by no more than rounding
    each merged weight to 16 bits can explain. ``s`` is peft's own scaling for the adapter's config (``lora_alpha /
    r``, or ``/ sqrt(r)`` with rsLoRA). Reads one tensor at a time, so it checks a 7B merge in little memory."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    pairs = lora_pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    result = MergeCheck(pairs=len(pairs), scale=scale)
    base_files = {name: f for f in base_weight_files(base, revision) for name in _tensor_names(f)}
    merged_files = {name: f for f in sorted(merged_dir.glob("*.safetensors")) for name in _tensor_names(f)}
    for name in sorted(set(base_files) ^ set(merged_files)):
        result.problems.append(f"{name} is in the {'base' if name in base_files else 'merged model'} only")
    for name in sorted(set(pairs) - set(merged_files)):
        result.problems.append(f"the adapter's pair for {name} has no weight in the merged model")
    generator = torch.Generator().manual_seed(0)
    for name in sorted(set(base_files) & set(merged_files)):
        with safe_open(str(base_files[name]), "pt") as f:
            weight = f.get_tensor(name)
        with safe_open(str(merged_files[name]), "pt") as f:
            merged = f.get_tensor(name)
        if name not in pairs:
            result.unchanged += 1
            if not torch.equal(merged, weight.to(merged.dtype)):
                result.problems.append(f"{name} is not the base's tensor")
            continue
        result.adapted += 1
        a, b = (t.float() for t in pairs[name])
        w = weight.float()
        if merged.shape != w.shape or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
            result.problems.append(
                f"{name}: shapes {tuple(merged.shape)}, W {tuple(w.shape)}, B·A {(b.shape[0], a.shape[1])} do not match"
            )
            continue
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


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return list(f.keys())


def _ulp(tensor):
    """The spacing of ``tensor``'s dtype at each of its values (a unit in the last place), as float32."""
    import torch

    magnitude = tensor.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude).float()


# --- what a learner is shown ---------------------------------------------------------------------------------------
def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit weights by their real shape.

    bitsandbytes packs two 4-bit values per byte, so a quantized weight's ``numel()`` is half its parameter count;
    its ``quant_state.shape`` is the true shape.
    """
    trainable = total = 0
    for param in model.parameters():
        n = parameter_count(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def parameter_count(param) -> int:
    """How many parameters ``param`` holds: a 4-bit weight's by its ``quant_state.shape`` (``numel()`` is half)."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()
