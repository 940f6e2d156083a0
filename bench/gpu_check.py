"""One command that checks the GPU path of notebooks 02, 03 and 05 without the Hub, in stages that each fit a device
call (under 8 minutes on one H100/H200).

    python bench/gpu_check.py                       # every stage, on a GPU
    python bench/gpu_check.py --only build 02       # some stages (05 needs 02's run; all need build's model)
    python bench/gpu_check.py --dry-run             # on the CPU: the same steps on the tiny model (what CI runs)

Stages: ``build`` writes a model folder (Mistral-7B's shape with random bf16 weights and the embedded tokenizer),
or reuses the one a previous check wrote; ``02``, ``03`` and ``05`` execute those notebooks with papermill, with
``MODEL`` set to that folder and ``HF_HUB_OFFLINE=1``, so they take the real GPU profile with the shipped sample
dialogues as data. The checks: the profile and the 4-bit layers, a falling loss, peak memory (allocated and
reserved) against the profile's measured budget, notebook 03 ready for ``notebook_launcher`` (no bitsandbytes, no
CUDA before it), the merged model, generation stopping at EOS. Every failure is a failed row with its reason; the
table is always printed, and the exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import RUNS_DIR  # noqa: E402

WORK_DIR = RUNS_DIR / "gpu_check"
MARKER = ".written-by-gpu_check"
STAGES = ("build", "02", "03", "05")
Check = tuple[str, bool, str]


def build_model(cuda: bool, folder: Path) -> tuple[Path, str]:
    """A Mistral-7B-shaped folder with random bf16 weights and the embedded tokenizer, built once and reused (the
    tiny model on a dry run); and what was done."""
    from utils.assets import ensure_tiny_model, load_tokenizer

    if not cuda:
        return ensure_tiny_model(), "the tiny model (dry run)"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder, f"reused {folder}"
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM._from_config(MistralConfig(), dtype=torch.bfloat16)  # Mistral-7B-v0.1's shape
    model.save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder, f"built {folder}"


class Checker:
    """Runs the stages and collects one row per check; a stage that raises becomes a failed row."""

    def __init__(self, dry_run: bool, steps: int, work: Path):
        import torch

        self.cuda = torch.cuda.is_available() and not dry_run
        self.steps, self.work = steps, work
        self.requested = "auto" if self.cuda else "smoke"
        self.rows: list[Check] = []
        self.model_dir = work / "mistral-7b-random"  # on a dry run, stage build points it at the tiny model
        self.executing: Path | None = None  # the executed copy of the notebook a stage runs

    def stage(self, name: str) -> None:
        start = time.perf_counter()
        try:
            getattr(self, f"stage_{name}")()
        except Exception as exc:  # noqa: BLE001 - one failed row per stage, the table is always printed
            self.rows.append((f"stage {name}", False, failure(exc, self.executing)))
        minutes = (time.perf_counter() - start) / 60
        self.rows.append((f"time of stage {name}", minutes < 8 or not self.cuda, f"{minutes:.1f} min (goal: < 8)"))

    def notebook(self, number: str, **parameters) -> str:
        from tools.notebook_runner import notebooks, printed_text, run_notebook

        path = notebooks([number])[0]
        self.executing = self.work / "executed" / path.name
        model = str(self.model_dir) if self.cuda else None
        return printed_text(
            run_notebook(path, self.requested, self.work / "executed", progress_bar=False, MODEL=model, **parameters)
        )

    def stage_build(self) -> None:
        folder, what = build_model(self.cuda, self.model_dir)
        self.model_dir = folder
        self.rows.append(("model folder", (folder / "config.json").is_file(), what))

    def stage_02(self) -> None:
        out = self.notebook("02", OUTPUT_DIR=str(self.work / "qlora"), MAX_STEPS=self.steps, FRESH=True)
        from utils.hardware import choose_profile
        from utils.tiny_world import loss_ends

        profile = choose_profile(self.requested, model=str(self.model_dir) if self.cuda else None, verbose=False)
        line = next((ln for ln in out.splitlines() if ln.startswith("Profile: ")), "")
        self.rows.append(("profile", line.startswith(f"Profile: {profile.name} "), line[:110]))
        layers = 7 * (32 if self.cuda else 4)
        self.rows.append(("4-bit layers", f"{layers} linear layers are 4-bit" in out, f"{layers} expected"))
        history = json.loads((self.work / "qlora" / "trainer_state.json").read_text())["log_history"]
        losses = [h["loss"] for h in history if "loss" in h]
        ends = loss_ends(losses)
        if ends is None:  # a short run: its first and last losses are single steps, nothing to go by
            self.rows.append(("loss falls", True, f"not measured: {len(losses)} logged steps, too few to tell (20+)"))
        else:
            detail = f"{ends[0]:.3f} -> {ends[1]:.3f} (medians) over {len(losses)} logged steps"
            self.rows.append(("loss falls", ends[1] < ends[0], detail))
        self.rows.append(self.memory_row(profile))
        merged = self.work / "qlora" / "merged"
        checked = "adapted weights: each equals W + " in out and "PROBLEM:" not in out
        self.rows.append(("adapter merged and checked", (merged / "config.json").is_file() and checked, str(merged)))

    def memory_row(self, profile) -> Check:
        """Peak memory of notebook 02's run, reserved against the H200 measurement for the profile's checkpointing
        (+10%), allocated shown beside it."""
        speed = json.loads((self.work / "qlora" / "speed.json").read_text())
        allocated, reserved = speed["peak_gpu_memory_allocated_gib"], speed["peak_gpu_memory_reserved_gib"]
        if not self.cuda:
            return ("peak memory", True, "no GPU (dry run)")
        from utils.scaling import measured_qlora_gib

        budget = round(1.1 * measured_qlora_gib()[profile.checkpoint_every], 1)
        ok = reserved is not None and reserved <= budget
        return ("peak memory", ok, f"{allocated} GiB allocated, {reserved} GiB reserved; budget {budget} GiB reserved")

    def stage_03(self) -> None:
        out = self.notebook("03", LAUNCH_DIR=str(self.work / "qlora-ddp"), SMOKE_STEPS=0, FRESH=True)
        ready = "ready for notebook_launcher: yes" in out
        line = next((ln for ln in out.splitlines() if ln.startswith("ready for notebook_launcher")), "no such line")
        self.rows.append(("notebook 03 ready for notebook_launcher", ready, line))

    def stage_05(self) -> None:
        if not (self.work / "qlora" / "merged" / "config.json").is_file():
            raise RuntimeError("needs stage 02's merged model (run --only 02 first)")
        out = self.notebook("05", RUNS=str(self.work), MAX_NEW_TOKENS=32)
        match = re.search(r"qlora \(merged\): (\d) of 4 answers ended at EOS", out)
        self.rows.append(("notebook 05 sampled", match is not None, match.group(0) if match else "no answers"))
        self.rows.append(("generation stops at EOS", *eos_stop(self.work / "qlora" / "merged", self.cuda)))


def failure(exc: BaseException, executed: Path | None) -> str:
    """One line for a stage that raised: a failing notebook's cell, its exception type and message, and where its
    executed copy is (papermill's own message is empty); any other exception's type and message."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        message = (exc.evalue or "").strip().splitlines()
        copy = executed or "(none)"
        return (
            f"cell {exc.cell_index}: {exc.ename}: {message[0] if message else '(no message)'} (executed copy: {copy})"
        )
    last = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()
    return last[0][:300] if last else type(exc).__name__


def eos_stop(model_dir: Path, cuda: bool) -> tuple[bool, str]:
    """Generation stops at EOS: greedy-generate once, then declare the first generated token EOS and generate again."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils import sampling
    from utils.assets import load_tokenizer

    tokenizer = load_tokenizer(None)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto" if cuda else None).eval()
    greedy = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    inputs = tokenizer(sampling.CARD_RENDERING, return_tensors="pt").to(model.device)
    with torch.no_grad():
        token = int(model.generate(**inputs, max_new_tokens=1, pad_token_id=tokenizer.pad_token_id, **greedy)[0, -1])
    stopped = sampling.generate(
        model, tokenizer, [sampling.CARD_RENDERING], max_new_tokens=16, eos_token_id=token, **greedy
    )[0]
    return stopped.stopped_at_eos and stopped.new_tokens == 1, f"stopped after {stopped.new_tokens} token(s)"


def claim(work: Path) -> str | None:
    """Take ``work`` for this check (new, empty, or written by an earlier check), or say why not."""
    if work.exists() and not work.is_dir():
        return f"{work} is a file; choose another --work"
    if work.is_dir() and any(work.iterdir()) and not (work / MARKER).is_file():
        return f"{work} holds files this check did not write; choose another --work"
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("Written by bench/gpu_check.py; its model folder is reused by the next check.\n")
    return None


def writable_file(name: str) -> bool:
    """Whether ``name`` can be written as a file: its folder exists and is writable, and it is not a folder."""
    path = Path(name)
    folder = path.parent if str(path.parent) else Path(".")
    return not path.is_dir() and folder.is_dir() and os.access(folder, os.W_OK)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU, as CI runs it")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="the stages to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 30 on a GPU, 6 dry)")
    parser.add_argument("--work", default=str(WORK_DIR), help="folder for the model and runs (kept between checks)")
    parser.add_argument("--json", default=None, help="also write the checks here")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU; run with --dry-run to check the same steps on the CPU", file=sys.stderr)
        return 2
    if args.json and not writable_file(args.json):
        print(f"error: --json {args.json}: not a file in an existing, writable folder", file=sys.stderr)
        return 2
    work = Path(args.work)
    problem = claim(work)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"
    checker = Checker(args.dry_run, args.steps or (6 if args.dry_run else 30), work)
    for name in STAGES:
        if name in args.only or (name == "build" and not checker.cuda):  # a dry run always takes the tiny model
            checker.stage(name)
    device = "CPU (dry run: tiny model)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"\nGPU path check on {device}")
    print(f"{'check':42s} {'result':6s} detail")
    for name, ok, detail in checker.rows:
        print(f"{name:42s} {'ok' if ok else 'FAILED':6s} {detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "checks": checker.rows}, indent=2))
    return 0 if all(ok for _, ok, _ in checker.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
