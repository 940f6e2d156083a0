"""Notebook 02 as a script: QLoRA SFT of Mistral-7B (or the embedded tiny Mistral) with TRL's SFTTrainer.

    python -m utils.sft --config configs/sft_qlora.yaml [--field value ...]
    python -m utils.sft --config configs/sft_qlora.yaml --profile smoke --output_dir runs/qlora --max_steps 30

YAML plus command-line overrides are parsed by TRL's own ``TrlParser`` into ``ScriptArguments``, ``SFTConfig`` and
``ModelConfig``. The hardware profile then fills in what depends on the GPU, except where the command line set it.
Re-running with the same ``--output_dir`` resumes from its newest checkpoint that loads, recognises a finished run
(and then changes nothing), and refuses settings that differ from the folder's (``--fresh true`` starts over).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils import RUNS_DIR
from utils.hardware import Profile
from utils.runs import Run, RunError, open_run, run_settings, saved_report

# peft 0.21 reads the model's old `is_gradient_checkpointing` attribute, which transformers 5 marks deprecated: the
# warning is about peft's code, not ours, and says nothing a learner can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

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
        default=None,
        metadata={
            "help": "sequences per optimizer step over all GPUs; sets gradient_accumulation_steps "
            "from the world size and per-device batch (the card: 512)"
        },
    )
    fresh: bool = field(default=False, metadata={"help": "start over in output_dir, removing its earlier run"})
    card_schedule: bool = field(
        default=False,
        metadata={
            "help": "the card's schedule: plan the cosine over dialogues / global batch steps, as "
            "TRL 0.7 did, and stop when the packed data ends (272 of 406 for the card)"
        },
    )
    dataset_revision: str = field(default="main", metadata={"help": "Hub dataset commit or tag to prepare"})


# Per-profile training settings: (per-device batch, gradient accumulation) keep 8 sequences per optimizer step
# and GPU, as the recipe (4 x 2) does. Smoke runs short sequences so the sample makes a few dozen steps, and a
# larger learning rate: LoRA on a random 64-wide model barely moves at 2e-4 in 30 steps.
GPU_TRAINING: dict[str, Any] = dict(
    per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=2, packing_strategy="bfd"
)
PROFILE_TRAINING: dict[str, dict[str, Any]] = {
    "smoke": dict(
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=1,
        max_length=256,
        logging_steps=1,
        save_steps=10,
        activation_checkpointing=False,
        num_train_epochs=3,
        learning_rate=3e-3,
        packing_strategy="bfd",
        report_to=[],
    ),
    # Every GPU profile trains 4 x 2 sequences per optimizer step, as the recipe does; memory is the business of the
    # profile's activation checkpointing (utils/hardware.py). 4 x 2 with checkpointing on every layer peaked at
    # 9.9 GiB reserved on an H200: inside a T4's 15 GiB. LoRA's optimizer states are ~0.5 GB, so a paged 8-bit
    # optimizer saves little there; `--optim paged_adamw_8bit` if needed.
    **dict.fromkeys(("gpu-16gb", "gpu-24gb", "gpu-40gb", "gpu-80gb"), GPU_TRAINING),
}


# --- configuration -------------------------------------------------------------------------------------------------
def parse_recipe(argv: list[str], in_child: bool | None = None):
    """``parse(argv)`` as plain namespaces (script, training, model, run), parsed in a child process while this one
    has a GPU and has not initialised CUDA.

    Creating ``TrainingArguments`` picks its device, which initialises CUDA (transformers 5.24,
    ``_setup_devices``); after that ``accelerate.notebook_launcher`` can no longer fork training processes
    (Kaggle's 2 x T4). Notebook 03 shows the recipe this way and keeps the launcher working.
    """
    import subprocess
    from types import SimpleNamespace

    import torch

    if in_child is None:
        in_child = torch.cuda.is_available() and not torch.cuda.is_initialized()
    if in_child:
        code = f"import json, sys; from utils.sft import _recipe_dicts; print(json.dumps(_recipe_dicts({argv!r})))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=Path.cwd(),
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        if out.returncode:
            raise ConfigError(_one_line(RuntimeError((out.stderr.strip().splitlines() or ["parse failed"])[-1])))
        parts = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        parts = _recipe_dicts(argv)
    return tuple(SimpleNamespace(**part) for part in parts)


def _recipe_dicts(argv: list[str]) -> list[dict]:
    import dataclasses

    script_args, training_args, model_args, run_args = parse(argv)
    return [
        dataclasses.asdict(script_args),
        training_args.to_dict(),
        dataclasses.asdict(model_args),
        dataclasses.asdict(run_args),
    ]


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


def check_config_file(argv: list[str]) -> None:
    """Raise ConfigError when ``--config`` names no file, or a file that is not a YAML/JSON mapping."""
    import yaml

    names = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    names += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in names:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name} not found")
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"config file {name} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"config file {name} must hold 'field: value' lines, got {type(content).__name__}")


def explicit_fields(argv: list[str]) -> set[str]:
    """Names given on the command line (``--name value`` or ``--name=value``), which the profile must not change."""
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def apply_profile(
    profile: Profile,
    script_args,
    training_args,
    model_args,
    explicit: set[str] = frozenset(),
    run_args: RunArguments | None = None,
    world_size: int | None = None,
):
    """Fill in what depends on the hardware (model, dtype, attention, batch), keeping values set on the CLI.

    Returns the updated SFTConfig (rebuilt with ``dataclasses.replace``, so its own checks run on the final values).
    """
    import dataclasses

    import torch

    from utils.assets import TINY_MODEL_DIR

    if "model_name_or_path" not in explicit:
        model_args.model_name_or_path = profile.model_id or str(TINY_MODEL_DIR)
    if "dataset_name" not in explicit and not Path(script_args.dataset_name).exists():
        if profile.is_smoke:
            script_args.dataset_name = str(SMOKE_DATA_DIR)
        elif profile.dataset != "HuggingFaceH4/ultrachat_200k":  # a GPU without the Hub: the shipped sample
            script_args.dataset_name = profile.dataset
    for name, value in (("dtype", profile.compute_dtype), ("attn_implementation", profile.attn_implementation)):
        if name not in explicit:
            setattr(model_args, name, value)
    half = profile.compute_dtype in ("bfloat16", "float16") and torch.cuda.is_available()
    # GPU profiles size QLoRA batches to the GPU; a full fine-tune keeps the recipe's batch (its memory is the
    # sharding engine's business, see utils/scaling.py). Smoke shrinks everything.
    sized = PROFILE_TRAINING.get(profile.name, {}) if profile.is_smoke or model_args.use_peft else {}
    changes = {
        **sized,
        "bf16": half and profile.compute_dtype == "bfloat16",
        "fp16": half and profile.compute_dtype == "float16",
    }
    if not profile.is_smoke and model_args.use_peft:  # checkpointing as the GPU's memory allows (utils/hardware.py)
        changes["activation_checkpointing"] = profile.checkpoint_every > 0
        if profile.checkpoint_every > 1:
            changes["activation_checkpointing_kwargs"] = {
                **(training_args.activation_checkpointing_kwargs or {}),
                "every_n_layers": profile.checkpoint_every,
            }
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
    """Raise ConfigError for a configuration that cannot work, before any weights are loaded: every number finite
    and in range, LoRA modules that exist, a dataset that can be read."""
    from utils.prepare_data import SourceError, local_path, open_source

    positive = (
        "max_length",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_steps",
        "learning_rate",
    )
    for name in positive:
        value = getattr(training_args, name)
        if value is None or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon"):
        value = getattr(training_args, name)
        if value is None or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number of 0 or more, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(training_args, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    epochs = training_args.num_train_epochs
    if training_args.max_steps <= 0 and (not math.isfinite(epochs) or epochs <= 0):
        raise ConfigError(f"num_train_epochs must be positive (or set max_steps), got {epochs}")
    if model_args.use_peft:
        if isinstance(model_args.lora_target_modules, str):  # TRL passes a single CLI value as a string
            model_args.lora_target_modules = [m for m in model_args.lora_target_modules.split(",") if m]
        if model_args.lora_r is None or model_args.lora_r < 1:
            raise ConfigError(f"lora_r must be a whole number of 1 or more, got {model_args.lora_r}")
        if not math.isfinite(model_args.lora_alpha) or model_args.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {model_args.lora_alpha}")
        if not 0 <= model_args.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
        modules = model_args.lora_target_modules or []
        unknown = [m for m in modules if m not in MISTRAL_LINEAR_MODULES and m != "all-linear"]
        if unknown or not modules:
            raise ConfigError(
                f"unknown LoRA target module(s) {', '.join(unknown) or '(none given)'}; Mistral's "
                f"linear layers are {', '.join(MISTRAL_LINEAR_MODULES)}"
            )
    if not script_args.dataset_name:
        raise ConfigError("no dataset: set dataset_name to the folder notebook 01 wrote (data/processed/ultrachat)")
    path = local_path(script_args.dataset_name)
    if path is not None and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if script_args.dataset_train_split not in splits:
            raise ConfigError(
                f"dataset {path} has no {script_args.dataset_train_split!r} split (it has "
                f"{', '.join(splits) or 'none'})"
            )
        if training_args.eval_strategy != "no" and script_args.dataset_test_split not in splits:
            print(
                f"Note: dataset {path} has no {script_args.dataset_test_split!r} split, so evaluation is off "
                "(eval_strategy no)."
            )
            training_args.eval_strategy = "no"
        return
    if Path(script_args.dataset_name) == SMOKE_DATA_DIR:
        return
    try:  # a source notebook 01's pipeline can prepare: a .jsonl/.json/.parquet file or folder, or a Hub id
        open_source(script_args.dataset_name)
    except SourceError as exc:
        raise ConfigError(
            f"dataset {script_args.dataset_name}: {exc}. Run notebook 01 or `python -m "
            f"utils.prepare_data --out data/processed/ultrachat` first"
        ) from None


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
def load_training_data(script_args, tokenizer, profile: Profile, revision: str = "main"):
    """The prepared DatasetDict (``input_ids`` only, so TRL uses our token ids as they are).

    ``dataset_name`` is notebook 01's output folder; anything else notebook 01's pipeline reads (a ``.jsonl`` file,
    a folder of them, a Hub id) is prepared first into ``runs/data/``, and the shipped sample when smoke has none.
    """
    import datasets

    from utils.prepare_data import is_current, local_path, open_source, prepare, save

    path = local_path(script_args.dataset_name)
    if path is None or not (path / "dataset_dict.json").is_file():
        smoke = Path(script_args.dataset_name) == SMOKE_DATA_DIR
        source = profile.dataset if smoke else script_args.dataset_name
        out = SMOKE_DATA_DIR if smoke else RUNS_DIR / "data" / Path(source).name.replace("/", "__")
        if not is_current(out):
            print(f"Preparing {source} into {out} (notebook 01's pipeline) ...")
            save(prepare(open_source(source, revision=revision), tokenizer, progress=False), out, source)
        path = out
    data = datasets.load_from_disk(str(path))
    keep = ["input_ids"]
    return {
        split: data[name].select_columns(keep)
        for split, name in (("train", script_args.dataset_train_split), ("test", script_args.dataset_test_split))
        if name in data
    }


def load_model(model_args, quantization=None, device_map: str | dict | None = None):
    """The base model, 4-bit when ``quantization`` is given (then on this process's GPU when there is one).

    ``device_map`` overrides the placement, e.g. "auto" to spill a 16-bit 7B model to CPU RAM when the GPU is small.
    """
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
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)


def start_run(script_args, training_args, model_args, run_args: RunArguments | None = None) -> Run:
    """Open ``output_dir`` for this run (``utils.runs.open_run``) and print what happens there; before any weights."""
    from accelerate import PartialState

    run_args = run_args or RunArguments()
    settings = run_settings(script_args, training_args, model_args, _world_size(), run_args.card_schedule)
    main_process = PartialState().is_main_process
    run = open_run(training_args.output_dir, settings, run_args.fresh, main_process)
    if main_process:  # one report, not one per process
        print("\n".join([*run.skipped, run.message]))
    return run


class StopWhenDataEnds(TrainerCallback):
    """The card's schedule: the trainer plans more steps than one pass over the packed data, and stops at its end."""

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def card_schedule_steps(dialogues: int, global_batch: int) -> int:
    """The steps TRL 0.7.4 planned: its ConstantLengthDataset reported the number of *dialogues* as its length, so
    the trainer planned ``ceil(dialogues / global batch)`` steps (406 for ultrachat_200k's 207,865 at 512) while the
    packed stream ran out earlier (the card's step 272, its "epoch 0.67")."""
    return math.ceil(dialogues / global_batch)


def train(
    script_args, training_args, model_args, profile: Profile, tokenizer=None, run_args: RunArguments | None = None
):
    """Open the run folder, build the trainer, resume when a checkpoint loads, train, save the adapter and the state.

    Returns the trainer, or None when the folder holds a finished run (which is left as it is).
    """
    from accelerate import PartialState
    from trl import SFTTrainer

    from utils.assets import load_tokenizer

    run_args = run_args or RunArguments()
    training_args.device  # noqa: B018 - lets TrainingArguments start the process group (gloo on a CPU) first
    with PartialState().main_process_first():  # rank 0 checks the folder, builds the cached assets and data first
        run = start_run(script_args, training_args, model_args, run_args)
        if run.finished:
            return None
        tokenizer = tokenizer or load_tokenizer(profile.model_id, revision=model_args.model_revision)
        data = load_training_data(script_args, tokenizer, profile, run_args.dataset_revision)
        model = load_model(model_args, bnb_config(model_args) if model_args.load_in_4bit else None)
    callbacks: list = [RankLog()]
    if run_args.card_schedule:
        per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        training_args.max_steps = card_schedule_steps(data["train"].num_rows, per_step * _world_size())
        callbacks.append(StopWhenDataEnds())
        print(
            f"card schedule: cosine planned over {training_args.max_steps} steps ({data['train'].num_rows} "
            f"dialogues / {per_step * _world_size()}), stopping when the packed data ends"
        )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("test") if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=lora_config(model_args) if model_args.use_peft else None,
        callbacks=callbacks,
    )
    resume_or_finish(trainer, run)
    save_outputs(trainer, tokenizer)
    trainer.run = run
    return trainer


def resume_or_finish(trainer, run: Run) -> None:
    """``trainer.train``, resuming from ``run.resume_from``; when that checkpoint already holds the last step, load it
    instead (``Trainer.train`` would take one step past ``max_steps`` from there)."""
    if not run.resume_is_final:
        trainer.train(resume_from_checkpoint=run.resume_from)
        return
    from transformers import TrainerState

    trainer._load_from_checkpoint(run.resume_from)  # the weights (adapter) of the last step
    trainer.state = TrainerState.load_from_json(str(Path(run.resume_from) / "trainer_state.json"))


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
            _say(
                f"[rank {args.process_index}/{args.world_size}] this rank holds {held:,} of {total:,} parameters "
                f"({100 * held / total:.0f}%: {'sharded' if held < total else 'a full replica'})"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and args.world_size > 1:
            _say(f"[rank {args.process_index}/{args.world_size}] step {state.global_step} loss {logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / "rank_logs"
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "global_step": state.global_step,
            "losses": [h["loss"] for h in state.log_history if "loss" in h],
        }
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(record) + "\n")


def _say(line: str) -> None:
    """One line in one write, so the lines of several processes sharing a terminal do not run into each other."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


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
    base = load_model(
        dataclasses.replace(model_args, dtype=dtype), device_map="auto" if torch.cuda.is_available() else None
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return Path(out_dir)


# --- what a learner is shown -------------------------------------------------------------------------------------
def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit weights by their real shape.

    bitsandbytes packs two 4-bit values per byte, so a quantized weight's ``numel()`` is half its parameter count;
    its ``quant_state.shape`` is the true shape.
    """
    trainable = total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        n = math.prod(state.shape) if state is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


RECIPE_FIELDS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "packing_strategy",
    "optim",
    "bf16",
    "fp16",
    "logging_steps",
    "save_steps",
    "report_to",
    "eval_strategy",
)
MODEL_FIELDS = ("model_name_or_path", "dtype", "attn_implementation")


def recipe_changes(config: str, training_args, model_args) -> list[tuple[str, Any, Any]]:
    """(setting, recipe value, this run's value) for each setting the profile or command line changed from the
    YAML recipe in ``config``: the diff a learner needs beside the recipe's table."""
    import yaml

    recipe = yaml.safe_load(Path(config).read_text())
    changes = []
    for name in (*MODEL_FIELDS, *RECIPE_FIELDS):
        value = getattr(model_args if name in MODEL_FIELDS else training_args, name)
        value = getattr(value, "value", value)
        default = recipe.get(name, "(TRL default)")
        if name in recipe and _same(recipe[name], value):
            continue
        if name not in recipe and name in ("max_steps", "optim") and value in (-1, "adamw_torch", "adamw_torch_fused"):
            continue
        changes.append((name, default, value))
    return changes


def _same(a, b) -> bool:
    try:
        return a == b or float(a) == float(b)
    except (TypeError, ValueError):
        return False


def print_recipe_changes(config: str, training_args, model_args, profile: Profile) -> None:
    """Print ``recipe_changes`` as 'setting: recipe -> this run' lines, or that the recipe runs as written."""
    changes = recipe_changes(config, training_args, model_args)
    if not changes:
        print(f"{config} runs as written.")
        return
    print(f"Changed from {config} for this run (profile {profile.name} and the arguments given):")
    width = max(len(name) for name, *_ in changes)
    for name, old, new in changes:
        print(f"  {name:<{width}}  {old!s:>22} -> {new}")


def fullest_row(trainer) -> int:
    """Index of the packed training row that holds the most dialogues (TRL's ``seq_lengths`` column)."""
    lengths = trainer.train_dataset["seq_lengths"]
    return max(range(len(lengths)), key=lambda i: len(lengths[i]))


def packed_row_table(trainer, row: int = 0, start: int = 0, count: int = 48):
    """One collated training row as a table: token, id, label (or "masked"), position id, dialogue index.

    Padding-free packing puts several dialogues in one row; ``position_ids`` restart at 0 where each begins, and
    attention is kept inside each dialogue. The labels are the input ids: the model predicts each next token.
    """
    import pandas as pd

    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[row]])
    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    positions = batch["position_ids"][0].tolist() if "position_ids" in batch else list(range(len(ids)))
    dialogue, dialogues = -1, []
    for p in positions:
        dialogue += p == 0
        dialogues.append(dialogue)
    table = pd.DataFrame(
        {
            "token": tokenizer.convert_ids_to_tokens(ids),
            "id": ids,
            "label": [("masked" if lab == -100 else lab) for lab in labels],
            "position id": positions,
            "dialogue": dialogues,
        }
    )
    return table.iloc[start : start + count]


def show_packed_row(table) -> None:
    """Display ``packed_row_table``: coloured HTML (a colour per dialogue, EOS in bold) where the front end renders
    HTML, the plain table otherwise."""
    from IPython.display import display

    palette = ["#e8f0fe", "#fde8e8", "#e6f4ea", "#fef7e0", "#f3e8fd", "#e0f7fa"]
    rows = []
    for index, r in table.iterrows():
        token = html_escape(r["token"])
        if r["token"] in ("</s>", "<s>"):
            token = f"<b>{token}</b>"
        label = '<span style="color:#999">masked</span>' if r["label"] == "masked" else r["label"]
        rows.append(
            f'<tr style="background:{palette[r["dialogue"] % len(palette)]}"><td>{index}</td><td>{token}</td>'
            f"<td>{r['id']}</td><td>{label}</td><td>{r['position id']}</td><td>{r['dialogue']}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("#", "token", "id", "label", "position id", "dialogue"))
    html = f'<table style="font-family:monospace;font-size:12px"><tr>{head}</tr>{"".join(rows)}</table>'
    display({"text/html": html, "text/plain": table.to_string()}, raw=True)


def html_escape(text: str) -> str:
    import html

    return html.escape(text).replace("\n", "\\n")


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


def speed_report(trainer, prepared_report: Path | None = None, estimate_epoch: bool = True) -> dict:
    """Peak GPU memory, tokens/s, seconds per step, and the estimated time for one epoch of ultrachat_200k.

    The epoch's token count comes from notebook 01's report when it processed the real dataset, otherwise from
    ultrachat_200k's typical 1,400 tokens per dialogue (the sample's dialogues are much shorter).
    """
    import torch

    summary = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
    runtime = summary.get("train_runtime", float("nan"))
    steps = trainer.state.global_step
    tokens = trainer.state.num_input_tokens_seen or 0
    tok_s = tokens / runtime if runtime and runtime >= 0.5 and tokens else float("nan")  # never from a 0-s run
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
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "ultrachat_200k_epoch_tokens": int(epoch_tokens),
        "ultrachat_200k_epoch_tokens_from": basis,
        "ultrachat_200k_epoch_hours": round(epoch_tokens / tok_s / 3600, 1) if tok_s > 0 and estimate_epoch else None,
    }


def main(argv: list[str] | None = None) -> int:
    from utils.hardware import choose_profile
    from utils.prepare_data import OutputError, SourceError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_config_file(argv)
        script_args, training_args, model_args, run_args = parse(argv)
        explicit = explicit_fields(argv)
        profile = choose_profile(
            run_args.profile, model=model_args.model_name_or_path if "model_name_or_path" in explicit else None
        )
        training_args = apply_profile(profile, script_args, training_args, model_args, explicit, run_args)
        validate(script_args, training_args, model_args)
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:  # includes a missing or malformed config file
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    training_args.include_num_input_tokens_seen = "all"
    start = time.perf_counter()
    try:
        trainer = train(script_args, training_args, model_args, profile, run_args=run_args)
    except (RunError, SourceError, OutputError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    out = Path(training_args.output_dir)
    if trainer is None:  # a finished run: report what it measured, change nothing
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return 0
        saved = saved_report(out)
        if saved:
            print(
                f"its report: {saved['steps']} steps, {saved['tokens_per_second']} tokens/s, "
                f"{saved['train_runtime_s']} s ({out / 'speed.json'})"
            )
        return 0
    report = speed_report(trainer, Path(script_args.dataset_name) / "report.json", not profile.is_smoke)
    if trainer.is_world_process_zero():
        trainer.run.save_report(report)
    if run_args.merge and model_args.use_peft and trainer.is_world_process_zero():
        merge_adapter(model_args, out / "adapter", out / "merged")
    if trainer.is_world_process_zero():
        trainer.run.finish(trainer.state.global_step, trainer.state.max_steps)
        final = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(
            f"done: {report['steps']} steps in {time.perf_counter() - start:.0f} s, final loss "
            f"{final[-1] if final else float('nan'):.4f}, {report['tokens_per_second']} tokens/s -> {out}"
        )
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
