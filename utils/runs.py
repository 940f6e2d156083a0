"""A training run's folder: whose it is, what settings shaped it, whether it finished, and what to resume.
``open_run`` runs before any weights load. It refuses a folder without our ``run.json`` whatever it holds (a user's
files are never resumed over or removed), a damaged ``run.json``, a folder a live run holds (``.lock``) and settings
that differ from the folder's. Resuming skips, by name, checkpoints that do not load or hold non-finite numbers."""

import contextlib
import fcntl
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from utils import ConfigError

TOOL = "utils.sft"
REPORT_FILE = "speed.json"
# What a run writes, and so all that fresh=True may remove from a folder whose run.json is ours (.merged.tmp-*: what
# a killed merge left); run.json last, so a folder cleared in part is still ours.
OWN_FOLDERS = ("checkpoint-*", "adapter", "model", "merged", ".merged.tmp-*", "runs", "rank_logs")
OWN_FILES = ("trainer_state.json", REPORT_FILE, "torchrun.log", "README.md", "run.json")
_HELD: dict[Path, int] = {}  # folders whose lock this process holds -> file descriptor


class RunError(ConfigError):
    """A run folder that cannot be used as asked: one line for the user."""


@dataclass
class Run:
    """What ``open_run`` decided for one output folder."""

    path: Path
    finished: bool = False
    resume_from: str | None = None
    resume_is_final: bool = False  # the checkpoint holds the last step: finish from it, train nothing
    message: str = ""
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints, with the reason

    def saved_report(self) -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            report = json.loads((self.path / REPORT_FILE).read_text())
            return report if isinstance(report, dict) else None
        return None

    def save_report(self, report: dict) -> None:  # a re-run of the finished run shows it again
        (self.path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    def finish(self, global_step: int, max_steps: int) -> None:
        """Mark the run finished (after its outputs are saved) and release the folder."""
        self._status("finished", global_step=global_step, max_steps=max_steps)

    def fail(self, why: str) -> None:
        """Mark the run stopped by an error (a re-run resumes from its newest good checkpoint) and release it."""
        self._status("failed", reason=why)

    def _status(self, status: str, **extra) -> None:
        if self.path.resolve() in _HELD:  # only the process holding the folder writes its record
            _write_record(self.path, {**read_record(self.path), "status": status, **extra})
        release(self.path)


def run_settings(script_args, training_args, model_args, world_size: int = 1, card_schedule: bool = False) -> dict:
    """Every setting that changes what a run trains or how: a resumed run must have the same, and ``run.json`` records
    them. A setting an earlier ``run.json`` lacks is not compared (it was not recorded)."""
    peft = bool(model_args.use_peft)
    lora = {k: getattr(model_args, k) for k in ("lora_r", "lora_alpha", "lora_dropout")}
    lora |= {k: bool(getattr(model_args, k)) for k in ("use_rslora", "use_dora")}  # rsLoRA scales by alpha/sqrt(r)
    lora |= {k: sorted(getattr(model_args, k) or []) for k in ("lora_target_modules", "lora_modules_to_save")}
    # the batch, the tokens that carry the loss, the optimizer (its state on disk), the schedule, the precision
    plain = ["per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "completion_only_loss"]
    plain += ["weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "learning_rate"]
    plain += ["warmup_steps", "num_train_epochs", "max_steps", "seed"]
    return {
        "model": model_args.model_name_or_path,
        "load_in_4bit": bool(model_args.load_in_4bit),
        "use_peft": peft,
        **{k: v if peft else None for k, v in lora.items()},
        "dataset": script_args.dataset_name,
        "world_size": world_size,
        "packing_strategy": training_args.packing_strategy if training_args.packing else None,
        **{k: bool(getattr(training_args, k)) for k in ("assistant_only_loss", "bf16", "fp16")},
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "card_schedule": card_schedule,
        **{k: getattr(training_args, k) for k in plain},
    }


def open_run(output_dir: str | Path, settings: dict, fresh: bool = False, main_process: bool = True) -> Run:
    """Check ``output_dir`` and decide what this run does there; the main process locks it until ``Run.finish``,
    ``Run.fail`` or ``release``, the others of the same run only read."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise RunError(f"output folder {path} is a file; choose a folder")
    record = read_record(path)
    if path.is_dir() and any(p.name != ".lock" for p in path.iterdir()) and not record:
        raise RunError(f"output folder {path} holds files this tool did not write; choose another folder")
    if main_process:
        lock(path)
    try:
        saved = record.get("settings") or {}
        if fresh and record and main_process:  # the others find the main process's new record: nothing to clear
            for pattern in (*OWN_FOLDERS, *OWN_FILES):
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
            steps = f"{record.get('global_step')}/{record.get('max_steps')} steps in {path}"
            again = "set FRESH = True (--fresh true) or another output folder to train again"
            return Run(path, finished=True, message=f"already trained: {steps}; {again}")
        resume, skipped = newest_loadable_checkpoint(path)
        run = Run(path, resume_from=resume, skipped=skipped, message="Starting a new run.")
        if skipped and not resume:
            run.message += " No checkpoint could be loaded, so training starts over."
        elif resume:
            state = json.loads((Path(resume) / "trainer_state.json").read_text())
            step, planned = state["global_step"], state["max_steps"]
            run.resume_is_final = 0 < planned <= step
            run.message = f"Resuming from {resume}: the previous run was interrupted after step {step}."
            if run.resume_is_final:
                end = f"the previous run reached its last step ({step}/{planned}) but was stopped before its final save"
                run.message = f"Finishing from {resume}: {end}."
        if main_process:
            _write_record(path, {"tool": TOOL, "settings": settings, "status": "running"})
        return run
    except BaseException:
        release(path)
        raise


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` in ``folder``, newest first."""
    found = [(int(p.name[11:]), p) for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and p.is_dir()]
    return sorted(found, reverse=True)


def newest_loadable_checkpoint(folder: str | Path) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint-N`` that can be resumed from, and a line for each newer one skipped as damaged."""
    skipped = []
    for _, ckpt in checkpoint_steps(Path(folder)):
        if (problem := checkpoint_problem(ckpt)) is None:
            return str(ckpt), skipped
        skipped.append(f"skipped {ckpt.name}: {problem}")
    return None, skipped


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a state, weight or optimizer file that would not load), or None."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (it was not finished writing)"
    except (OSError, ValueError):
        return "trainer_state.json is damaged"
    kinds = {"global_step": int, "max_steps": int, "epoch": (int, float), "log_history": list}
    if missing := [k for k, kind in kinds.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]:
        return f"trainer_state.json is incomplete (no valid {missing[0]})"
    for logged in state["log_history"]:
        loss = logged.get("loss", 0.0)
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            return f"its log has a non-finite loss at step {logged.get('step', '?')}"
    if not (weights := sorted(ckpt.glob("*.safetensors"))):
        return "no weights (*.safetensors)"
    states = [*ckpt.glob("*.pt"), *ckpt.glob("rng_state*.pth")]  # what resuming loads (not training_args.bin)
    return next((p for p in map(_file_problem, [*weights, *states]) if p), None)


def _file_problem(file: Path) -> str | None:
    """Why a weight or state file would not load on resume, or None. Weights must be finite and within 1e6: a trained
    LLM's are of order 1 to 100, and one beyond 1e6 overflows bfloat16 activations within a layer or two, whatever the
    loss log says. Tensors are read one at a time, so a large checkpoint is checked in little memory."""
    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    try:
        if file.suffix != ".safetensors":
            if not zipfile.is_zipfile(file):
                return f"{file.name} is damaged"
            with safe_globals():  # numpy's RNG state, as the Trainer loads it
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            return None
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = tensors.get_tensor(name)
                if not tensor.is_floating_point() or not tensor.numel():
                    continue
                if not bool(torch.isfinite(tensor).all()):
                    return f"{file.name} holds NaN or infinite values ({name})"
                if (largest := float(tensor.abs().max())) > 1e6:
                    return f"{file.name} holds a value of {largest:.3g} ({name}), beyond any trained weight"
    except Exception as exc:  # noqa: BLE001 - safetensors and torch.load raise many types for damaged files
        return f"{file.name} is damaged ({type(exc).__name__})"
    return None


def lock(path: Path) -> None:
    """Hold ``path/.lock`` for this process, or raise RunError when a live run holds it."""
    path = path.resolve()
    if path in _HELD:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"cannot write to output folder {path} ({exc.strerror}); choose another output folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        in_use = f"{path} is in use by another training run (pid {holder})"
        raise RunError(f"{in_use}; wait for it to end or choose another output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = fd


def release(path: Path) -> None:
    """Let go of the folder's lock, if this process holds it."""
    if (fd := _HELD.pop(Path(path).resolve(), None)) is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_record(path: Path) -> dict:
    """The folder's ``run.json`` when this tool wrote it; {} when there is none; RunError when it is unreadable."""
    file = path / "run.json"
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        why = f"{file} is damaged, so this run's settings cannot be checked"
        raise RunError(f"{why}; repair or remove it, or choose another output folder") from None
    if not isinstance(record, dict) or record.get("tool") != TOOL or not isinstance(record.get("settings"), dict):
        raise RunError(f"{file} was not written by {TOOL}; choose another output folder")
    return record


def _write_record(path: Path, record: dict) -> None:
    tmp = path / f".run.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path / "run.json")
