"""A training run's folder: whose it is, what settings shaped it, whether it finished, and what to resume.

``open_run`` is called before any weights load. It refuses a file; a folder this tool did not write (no ``run.json``
of ours), whatever else it holds: a user's files are never resumed over or removed; an unreadable ``run.json`` (never
a fresh start over someone's checkpoints); a folder a live run holds (``.lock``); and settings that shape the
checkpoints but differ from the folder's. A finished run is left as it is, its saved report reused. Otherwise training
resumes from the newest checkpoint that loads and holds finite numbers; damaged ones are named and skipped.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from utils import ConfigError

TOOL = "utils.sft"
RUN_FILE = "run.json"
REPORT_FILE = "speed.json"
LOCK_FILE = ".lock"
# What a run writes, and so all that fresh=True may remove from a folder whose run.json is ours (.merged.tmp-*: what
# a killed merge left).
OWN_FOLDERS = ("checkpoint-*", "adapter", "model", "merged", ".merged.tmp-*", "runs", "rank_logs")
OWN_FILES = ("trainer_state.json", REPORT_FILE, "torchrun.log", "README.md", RUN_FILE)
# The weights of a trained LLM (base, LoRA, norm scales) are of order 1 to 100; one beyond 1e6 multiplies activations
# past what a layer or two of bfloat16 can hold, so a checkpoint holding one is damaged whatever its loss log says.
WEIGHT_LIMIT = 1e6
STATE_KEYS = {"global_step": int, "max_steps": int, "epoch": (int, float), "log_history": list}
_HELD: dict[Path, int] = {}  # folders whose lock this process holds -> file descriptor


class RunError(ConfigError):
    """A run folder that cannot be used as asked: one line for the user."""


@dataclass
class Run:
    """What ``open_run`` decided for one output folder."""

    path: Path
    settings: dict
    finished: bool = False
    resume_from: str | None = None
    resume_is_final: bool = False  # the checkpoint holds the last step: finish from it, train nothing
    message: str = ""
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints, with the reason

    def saved_report(self) -> dict | None:
        """The speed report the run saved when it finished (``speed.json``), or None."""
        try:
            report = json.loads((self.path / REPORT_FILE).read_text())
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    def save_report(self, report: dict) -> None:
        """Write the run's speed report, which a re-run of the finished run shows again."""
        (self.path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    def finish(self, global_step: int, max_steps: int) -> None:
        """Mark the run finished (after its outputs are saved) and release the folder."""
        self._status("finished", global_step=global_step, max_steps=max_steps)

    def fail(self, why: str) -> None:
        """Mark the run stopped by an error (a re-run resumes from its newest good checkpoint) and release it."""
        self._status("failed", reason=why)

    def _status(self, status: str, **extra) -> None:
        if self.path.resolve() in _HELD:  # only the process holding the folder writes its record
            _write_record(self.path, {**read_record(self.path), "settings": self.settings, "status": status, **extra})
        release(self.path)


def run_settings(script_args, training_args, model_args, world_size: int = 1, card_schedule: bool = False) -> dict:
    """Every setting that changes what a run trains or how (the model, LoRA and its scale, the tokens that carry the
    loss, the batch, the optimizer and its state, the schedule, the precision): a resumed run must have the same, and
    ``run.json`` records them. A setting an earlier ``run.json`` lacks is not compared (it was not recorded)."""
    peft = bool(model_args.use_peft)
    return {
        "model": model_args.model_name_or_path,
        "load_in_4bit": bool(model_args.load_in_4bit),
        "use_peft": peft,
        "lora_r": model_args.lora_r if peft else None,
        "lora_alpha": model_args.lora_alpha if peft else None,
        "lora_dropout": model_args.lora_dropout if peft else None,
        "lora_target_modules": sorted(model_args.lora_target_modules or []) if peft else None,
        "use_rslora": bool(model_args.use_rslora) if peft else None,  # the LoRA scale: alpha/sqrt(r), not alpha/r
        "use_dora": bool(model_args.use_dora) if peft else None,
        "lora_modules_to_save": sorted(model_args.lora_modules_to_save or []) if peft else None,
        "dataset": script_args.dataset_name,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": world_size,
        "max_length": training_args.max_length,
        "packing_strategy": training_args.packing_strategy if training_args.packing else None,
        "assistant_only_loss": bool(training_args.assistant_only_loss),  # which tokens carry the loss
        "completion_only_loss": training_args.completion_only_loss,
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),  # the optimizer state on disk
        "weight_decay": training_args.weight_decay,
        "adam_beta1": training_args.adam_beta1,
        "adam_beta2": training_args.adam_beta2,
        "adam_epsilon": training_args.adam_epsilon,
        "max_grad_norm": training_args.max_grad_norm,
        "bf16": bool(training_args.bf16),
        "fp16": bool(training_args.fp16),
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "warmup_steps": training_args.warmup_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "card_schedule": card_schedule,
        "seed": training_args.seed,
    }


def open_run(output_dir: str | Path, settings: dict, fresh: bool = False, main_process: bool = True) -> Run:
    """Check ``output_dir`` and decide what this run does there (see the module docstring). The main process also
    locks the folder until ``Run.finish``, ``Run.fail`` or ``release``; other processes of the same run only read."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RunError(f"output folder {path} is a file; choose a folder")
    record = read_record(path)
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not record:
        raise RunError(f"output folder {path} holds files this tool did not write; choose another folder")
    if main_process:
        lock(path)
    try:
        saved = record.get("settings") or {}
        if fresh and record:
            for pattern in (*OWN_FOLDERS, *OWN_FILES):  # run.json last: a folder cleared in part is still ours
                for item in path.glob(pattern):
                    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
            record = {}
        elif k := next((k for k in settings if k in saved and saved[k] != settings[k]), None):
            raise RunError(
                f"{path} holds a run with {k}={saved[k]!r}; this run asks for {k}={settings[k]!r}. Set FRESH = True "
                "(--fresh true) to start over there, or choose another output folder"
            )
        if record.get("status") == "finished":
            release(path)
            message = (
                f"already trained: {record.get('global_step')}/{record.get('max_steps')} steps in {path}; "
                "set FRESH = True (--fresh true) or another output folder to train again"
            )
            return Run(path, settings, finished=True, message=message)
        run = _resume_point(path, settings)
        if main_process:
            _write_record(path, {"tool": TOOL, "settings": settings, "status": "running"})
        return run
    except BaseException:
        if main_process:
            release(path)
        raise


def _resume_point(path: Path, settings: dict) -> Run:
    resume, skipped = newest_loadable_checkpoint(path)
    if not resume:
        why = " No checkpoint could be loaded, so training starts over." if skipped else ""
        return Run(path, settings, message=f"Starting a new run.{why}", skipped=skipped)
    state = json.loads((Path(resume) / "trainer_state.json").read_text())
    step, planned = state["global_step"], state["max_steps"]
    final = 0 < planned <= step
    message = (
        f"Finishing from {resume}: the previous run reached its last step ({step}/{planned}) but was stopped before "
        "its final save."
        if final
        else f"Resuming from {resume}: the previous run was interrupted after step {step}."
    )
    return Run(path, settings, resume_from=resume, resume_is_final=final, message=message, skipped=skipped)


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` in ``folder``, newest first."""
    found = [(int(p.name[11:]), p) for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and p.is_dir()]
    return sorted(found, reverse=True)


def newest_loadable_checkpoint(folder: str | Path) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint-N`` that can be resumed from, and a line for each newer one skipped as damaged."""
    skipped = []
    for _, ckpt in checkpoint_steps(Path(folder)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt), skipped
        skipped.append(f"skipped {ckpt.name}: {problem}")
    return None, skipped


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None: its state must parse and hold what the Trainer reads,
    every weight file must load with finite values, and the optimizer, scheduler and RNG states must load."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (it was not finished writing)"
    except (OSError, ValueError):
        return "trainer_state.json is damaged"
    missing = [k for k, kind in STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if missing:
        return f"trainer_state.json is incomplete (no valid {missing[0]})"
    for logged in state["log_history"]:
        loss = logged.get("loss", 0.0)
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            return f"its log has a non-finite loss at step {logged.get('step', '?')}"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    states = [*ckpt.glob("*.pt"), *ckpt.glob("rng_state*.pth")]  # what resuming loads (not training_args.bin)
    problems = itertools.chain(map(_weights_problem, weights), map(_pickle_problem, states))
    return next((p for p in problems if p), None)


def _weights_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be trusted: unreadable, a tensor with NaN or infinite values, or one beyond
    ``WEIGHT_LIMIT``. Tensors are read one at a time, so a large checkpoint is checked in little memory."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = tensors.get_tensor(name)
                if not tensor.is_floating_point() or not tensor.numel():
                    continue
                if not bool(torch.isfinite(tensor).all()):
                    return f"{file.name} holds NaN or infinite values ({name})"
                largest = float(tensor.abs().max())
                if largest > WEIGHT_LIMIT:
                    return f"{file.name} holds a value of {largest:.3g} ({name}), beyond any trained weight"
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        return f"{file.name} is damaged ({type(exc).__name__})"
    return None


def _pickle_problem(file: Path) -> str | None:
    """Why an optimizer, scheduler or RNG state file would not load on resume, or None."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    if not zipfile.is_zipfile(file):
        return f"{file.name} is damaged"
    try:
        with safe_globals():  # numpy's RNG state, as the Trainer loads it
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        return f"{file.name} is damaged ({type(exc).__name__})"
    return None


def lock(path: Path) -> None:
    """Hold ``path/.lock`` for this process, or raise RunError when a live run holds it."""
    path = path.resolve()
    if path in _HELD:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"cannot write to output folder {path} ({exc.strerror}); choose another output folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunError(
            f"{path} is in use by another training run (pid {holder}); wait for it to end or choose another output "
            "folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = fd


def release(path: Path) -> None:
    """Let go of the folder's lock, if this process holds it."""
    fd = _HELD.pop(Path(path).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_record(path: Path) -> dict:
    """The folder's ``run.json`` when this tool wrote it; {} when there is none; RunError when it is unreadable."""
    file = path / RUN_FILE
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise RunError(
            f"{file} is damaged, so this run's settings cannot be checked; repair or remove it, or choose another "
            "output folder"
        ) from None
    if not isinstance(record, dict) or record.get("tool") != TOOL or not isinstance(record.get("settings"), dict):
        raise RunError(f"{file} was not written by {TOOL}; choose another output folder")
    return record


def _write_record(path: Path, record: dict) -> None:
    tmp = path / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path / RUN_FILE)
