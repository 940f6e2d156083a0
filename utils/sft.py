"""Notebook 02 as a script: QLoRA SFT of Mistral-7B (or the embedded tiny Mistral) with TRL's SFTTrainer.

    python -m utils.sft --config configs/sft_qlora.yaml [--field value ...]
    python -m utils.sft --config configs/sft_qlora.yaml --profile smoke --output_dir runs/qlora --max_steps 30

YAML plus command-line overrides are parsed by TRL's own ``TrlParser`` into ``ScriptArguments``, ``SFTConfig`` and
``ModelConfig``. The hardware profile then fills in what depends on the GPU, except where the command line set it.
Re-running with the same ``--output_dir`` resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils import RUNS_DIR
from utils.hardware import Profile

MISTRAL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ULTRACHAT_200K_TRAIN_ROWS = 207_865
ULTRACHAT_TOKENS_PER_DIALOGUE = 1_400  # ultrachat_200k with the Zephyr template and Mistral tokenizer, typical
SMOKE_DATA_DIR = RUNS_DIR / "data" / "ultrachat_sample"


class ConfigError(ValueError):
    """A configuration that cannot work, found before any weights load: one line for the user."""


@dataclass
class RunArguments:
    """Options of this script that TRL's dataclasses do not have."""

    profile: str = field(default="auto", metadata={"help": "auto, smoke, or a GPU profile (utils/hardware.py)"})
    merge: bool = field(default=True, metadata={"help": "merge the adapter into a 16-bit base after training"})
    global_batch_size: int | None = field(
        default=None, metadata={"help": "sequences per optimizer step over all GPUs; sets gradient_accumulation_steps "
                                        "from the world size and per-device batch (the card: 512)"})


# Per-profile training settings: (per-device batch, gradient accumulation) keep 8 sequences per optimizer step
# and GPU, as the recipe (4 x 2) does. Smoke runs short sequences so the sample makes a few dozen steps, and a
# larger learning rate: LoRA on a random 64-wide model barely moves at 2e-4 in 30 steps.
PROFILE_TRAINING: dict[str, dict[str, Any]] = {
    "smoke": dict(per_device_train_batch_size=2, per_device_eval_batch_size=2, gradient_accumulation_steps=1,
                  max_length=256, logging_steps=1, save_steps=10, activation_checkpointing=False, num_train_epochs=3,
                  learning_rate=3e-3,
                  packing_strategy="bfd", report_to=[]),
    "gpu-16gb": dict(per_device_train_batch_size=1, per_device_eval_batch_size=2, gradient_accumulation_steps=8,
                     packing_strategy="bfd", optim="paged_adamw_8bit"),
    "gpu-24gb": dict(per_device_train_batch_size=2, per_device_eval_batch_size=4, gradient_accumulation_steps=4,
                     packing_strategy="bfd"),
    "gpu-40gb": dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=2,
                     packing_strategy="bfd"),
}


# --- configuration -------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None):
    """Parse ``--config YAML`` plus overrides into (ScriptArguments, SFTConfig, ModelConfig, RunArguments)."""
    import torch
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():  # a CPU: no bf16 (SFTConfig refuses it), and gloo for several processes
        given = explicit_fields(argv)
        defaults = {"bf16": "false", "use_cpu": "true"}
        if _world_size() > 1:  # started by torchrun/accelerate with several processes
            defaults["ddp_backend"] = "gloo"
        argv += [x for name, value in defaults.items() if name not in given for x in (f"--{name}", value)]
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, RunArguments))
    return parser.parse_args_and_config(argv)


def explicit_fields(argv: list[str]) -> set[str]:
    """Names given on the command line (``--name value`` or ``--name=value``), which the profile must not change."""
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def apply_profile(profile: Profile, script_args, training_args, model_args, explicit: set[str] = frozenset(),
                  run_args: RunArguments | None = None, world_size: int | None = None):
    """Fill in what depends on the hardware (model, dtype, attention, batch), keeping values set on the CLI.

    Returns the updated SFTConfig (rebuilt with ``dataclasses.replace``, so its own checks run on the final values).
    """
    import dataclasses

    import torch

    from utils.assets import TINY_MODEL_DIR

    if profile.is_smoke:
        if "model_name_or_path" not in explicit:
            model_args.model_name_or_path = str(TINY_MODEL_DIR)
        if not Path(script_args.dataset_name).exists() and "dataset_name" not in explicit:
            script_args.dataset_name = str(SMOKE_DATA_DIR)
    for name, value in (("dtype", profile.compute_dtype), ("attn_implementation", profile.attn_implementation)):
        if name not in explicit:
            setattr(model_args, name, value)
    half = profile.compute_dtype in ("bfloat16", "float16") and torch.cuda.is_available()
    # GPU profiles size QLoRA batches to the GPU; a full fine-tune keeps the recipe's batch (its memory is the
    # sharding engine's business, see utils/scaling.py). Smoke shrinks everything.
    sized = PROFILE_TRAINING.get(profile.name, {}) if profile.is_smoke or model_args.use_peft else {}
    changes = {**sized,
               "bf16": half and profile.compute_dtype == "bfloat16", "fp16": half and profile.compute_dtype == "float16"}
    changes = {k: v for k, v in changes.items() if k not in explicit}
    if run_args is not None and run_args.global_batch_size and not profile.is_smoke:
        from utils.scaling import accumulation_for

        per_device = changes.get("per_device_train_batch_size", training_args.per_device_train_batch_size)
        world = world_size or _world_size()
        changes["gradient_accumulation_steps"] = accumulation_for(run_args.global_batch_size, world, per_device)
    return dataclasses.replace(training_args, **changes)


def _world_size() -> int:
    """Processes in this run, as torchrun and accelerate announce it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(script_args, training_args, model_args) -> None:
    """Raise ConfigError for a configuration that cannot work, before any weights are loaded."""
    for name in ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        value = getattr(training_args, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value}")
    if training_args.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be positive, got {training_args.learning_rate}")
    modules = model_args.lora_target_modules or []
    unknown = [m for m in modules if m not in MISTRAL_LINEAR_MODULES and m != "all-linear"]
    if unknown:
        raise ConfigError(f"unknown LoRA target module(s) {', '.join(unknown)}; Mistral's linear layers are "
                          f"{', '.join(MISTRAL_LINEAR_MODULES)}")
    if not script_args.dataset_name:
        raise ConfigError("no dataset: set dataset_name to the folder notebook 01 wrote (data/processed/ultrachat)")
    path = Path(script_args.dataset_name)
    if not path.exists() and path != SMOKE_DATA_DIR and (path.is_absolute() or script_args.dataset_name.count("/") != 1):
        raise ConfigError(f"dataset {script_args.dataset_name} not found: run notebook 01 or "
                          f"`python -m utils.prepare_data --out {script_args.dataset_name}` first")


# --- the objects a learner came to see -----------------------------------------------------------------------------
def bnb_config(model_args):
    """4-bit NF4 quantization of the frozen base, computing in the profile's dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=getattr(torch, model_args.dtype),
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
    )


def lora_config(model_args):
    """LoRA adapters of rank r on every linear layer of the attention and MLP blocks."""
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


# --- data, model, training -----------------------------------------------------------------------------------------
def load_training_data(script_args, tokenizer, profile: Profile):
    """The prepared DatasetDict (``input_ids`` only, so TRL uses our token ids as they are).

    A missing smoke dataset is prepared from the shipped sample; a Hub id is prepared with notebook 01's pipeline.
    """
    import datasets

    from utils.prepare_data import open_source, prepare, save

    path = Path(script_args.dataset_name)
    if not path.exists():
        source = profile.dataset if path == SMOKE_DATA_DIR else script_args.dataset_name
        out = path if path == SMOKE_DATA_DIR else RUNS_DIR / "data" / source.replace("/", "__")
        if not out.exists():
            print(f"Preparing {source} into {out} (notebook 01's pipeline) ...")
            save(prepare(open_source(source), tokenizer, progress=False), out, source)
        path = out
    data = datasets.load_from_disk(str(path))
    keep = ["input_ids"]
    return {split: data[name].select_columns(keep) for split, name in
            (("train", script_args.dataset_train_split), ("test", script_args.dataset_test_split)) if name in data}


def load_model(model_args, quantization=None, device_map: str | dict | None = None):
    """The base model, 4-bit when ``quantization`` is given (then on this process's GPU when there is one).

    ``device_map`` overrides the placement, e.g. "auto" to spill a 16-bit 7B model to CPU RAM when the GPU is small.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from utils.assets import TINY_MODEL_DIR, ensure_tiny_model

    if Path(model_args.model_name_or_path) == TINY_MODEL_DIR:
        ensure_tiny_model()
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, model_args.dtype), attn_implementation=model_args.attn_implementation)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif torch.cuda.is_available() and quantization is not None:  # 4-bit weights live on this process's GPU
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written completely (has trainer_state.json)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def train(script_args, training_args, model_args, profile: Profile, tokenizer=None):
    """Build the trainer, resume when a checkpoint exists, train, save the adapter and the state. Returns the trainer."""
    from accelerate import PartialState
    from trl import SFTTrainer

    from utils.assets import load_tokenizer

    training_args.device  # noqa: B018 - lets TrainingArguments start the process group (gloo on a CPU) first
    with PartialState().main_process_first():  # rank 0 builds the cached tokenizer, tiny model and data first
        tokenizer = tokenizer or load_tokenizer(profile.model_id)
        data = load_training_data(script_args, tokenizer, profile)
        model = load_model(model_args, bnb_config(model_args) if model_args.load_in_4bit else None)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("test") if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=lora_config(model_args) if model_args.use_peft else None,
        callbacks=[RankLog()],
    )
    resume = latest_checkpoint(training_args.output_dir)
    if resume:
        print(f"Resuming from {resume} (a previous run was interrupted).")
    trainer.train(resume_from_checkpoint=resume)
    save_outputs(trainer, tokenizer)
    return trainer


def save_outputs(trainer, tokenizer) -> Path:
    """Save the adapter (or, for a full fine-tune, the model) as safetensors with the tokenizer and chat template,
    and trainer_state.json, in output_dir. Returns the adapter/model folder."""
    out = Path(trainer.args.output_dir)
    final = out / ("adapter" if _is_peft(trainer.model) else "model")
    trainer.save_model(str(final))  # rank 0 writes; gathers sharded weights under FSDP/ZeRO-3
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
    trainer.save_state()  # trainer_state.json with the log history, read by notebook 04
    return final


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class RankLog(TrainerCallback):
    """Print each rank's training loss as it is logged, and write ``rank_logs/rank<N>.json`` at the end."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and args.world_size > 1 and model is not None:  # wrapped (and sharded) by now
            held, total = parameters_held(model)
            print(f"[rank {args.process_index}/{args.world_size}] this rank holds {held:,} of {total:,} parameters "
                  f"({100 * held / total:.0f}%: {'sharded' if held < total else 'a full replica'})", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and args.world_size > 1:
            print(f"[rank {args.process_index}/{args.world_size}] step {state.global_step} loss {logs['loss']:.4f}",
                  flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / "rank_logs"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"rank": args.process_index, "world_size": args.world_size, "global_step": state.global_step,
                  "losses": [h["loss"] for h in state.log_history if "loss" in h]}
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(record) + "\n")


def parameters_held(model) -> tuple[int, int]:
    """(parameters stored on this rank, parameters of the whole model): they differ when FSDP shards the model."""
    held = total = 0
    for param in model.parameters():
        total += param.numel()
        held += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return held, total


def load_adapter(base, adapter_dir: str | Path):
    """``base`` plus the saved LoRA adapter, kept in the dtype it was saved in.

    TRL trains QLoRA adapters in bf16; PEFT would create them in the base's dtype. Restoring the saved dtype makes
    the reloaded model compute exactly as the trained one did.
    """
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


def merge_adapter(model_args, adapter_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Load the base in 16-bit, apply the adapter, merge it into the weights and save model + tokenizer."""
    import dataclasses

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype = dtype or merge_dtype(model_args)
    # 16-bit Mistral-7B is 14.5 GB: on the GPU where it fits, spilling to CPU RAM where it does not (device_map auto)
    base = load_model(dataclasses.replace(model_args, dtype=dtype),
                      device_map="auto" if torch.cuda.is_available() else None)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return Path(out_dir)


# --- checks and report ---------------------------------------------------------------------------------------------
def label_checks(trainer) -> dict:
    """Collate one training batch and check what the loss sees: EOS kept in the labels, share of loss tokens."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(4, len(trainer.train_dataset)))])
    ids, labels = batch["input_ids"], batch["labels"]
    eos = trainer.processing_class.eos_token_id
    eos_positions = ids == eos
    return {
        "rows": int(ids.shape[0]),  # padding-free batches are one long row
        "tokens": int(ids.numel()),
        "eos_tokens": int(eos_positions.sum()),
        "eos_tokens_in_loss": int((labels[eos_positions] == eos).sum()),
        "loss_token_share": round(float((labels != -100).float().mean()), 4),
        "pad_token": trainer.processing_class.pad_token,
    }


def speed_report(trainer, prepared_report: Path | None = None) -> dict:
    """Peak GPU memory, tokens/s, seconds per step, and the estimated time for one epoch of ultrachat_200k.

    The epoch's token count comes from notebook 01's report when it processed the real dataset, otherwise from
    ultrachat_200k's typical 1,400 tokens per dialogue (the sample's dialogues are much shorter).
    """
    import torch

    summary = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
    runtime = summary.get("train_runtime", float("nan"))
    steps = trainer.state.global_step
    tokens = trainer.state.num_input_tokens_seen or 0
    tok_s = tokens / runtime if runtime and tokens else float("nan")
    epoch_tokens, basis = ULTRACHAT_200K_TRAIN_ROWS * ULTRACHAT_TOKENS_PER_DIALOGUE, "1,400 tokens x 207,865 dialogues"
    if prepared_report and prepared_report.is_file():
        train = json.loads(prepared_report.read_text())["outputs"].get("train", {})
        if train.get("dialogues", 0) >= 100_000:
            epoch_tokens, basis = train["total_tokens"], f"notebook 01's count ({prepared_report})"
    return {
        "steps": steps,
        "train_runtime_s": round(runtime, 1),
        "seconds_per_step": round(runtime / steps, 3) if steps else None,
        "tokens_seen": int(tokens),
        "tokens_per_second": round(tok_s, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "ultrachat_200k_epoch_tokens": int(epoch_tokens),
        "ultrachat_200k_epoch_tokens_from": basis,
        "ultrachat_200k_epoch_hours": round(epoch_tokens / tok_s / 3600, 1) if tok_s > 0 else None,  # False for NaN
    }


def main(argv: list[str] | None = None) -> int:
    from utils.hardware import choose_profile

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script_args, training_args, model_args, run_args = parse(argv)
        profile = choose_profile(run_args.profile)
        training_args = apply_profile(profile, script_args, training_args, model_args, explicit_fields(argv), run_args)
        validate(script_args, training_args, model_args)
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    training_args.include_num_input_tokens_seen = "all"
    start = time.perf_counter()
    trainer = train(script_args, training_args, model_args, profile)
    report = speed_report(trainer, Path(script_args.dataset_name) / "report.json")
    out = Path(training_args.output_dir)
    if run_args.merge and model_args.use_peft and trainer.is_world_process_zero():
        merge_adapter(model_args, out / "adapter", out / "merged")
    if trainer.is_world_process_zero():
        (out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
        final = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"done: {report['steps']} steps in {time.perf_counter() - start:.0f} s, final loss "
              f"{final[-1] if final else float('nan'):.4f}, {report['tokens_per_second']} tokens/s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
