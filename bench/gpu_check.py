"""One command that checks the GPU path of notebooks 02, 03 and 05, without the Hub: under 8 minutes on one H100/H200.

    python bench/gpu_check.py                 # on a GPU: a random-weight Mistral-7B folder, the real GPU profile
    python bench/gpu_check.py --dry-run       # on the CPU: the same steps on the tiny model (what CI runs)

Steps: build a model folder (Mistral-7B's shape with random weights, with the embedded tokenizer), then execute with
papermill notebook 02 (QLoRA on the sample dialogues, a few dozen steps, merge), notebook 03 (its single-GPU cells;
the launch cells skip) and notebook 05 (sampling), all with ``MODEL`` set to that folder and ``HF_HUB_OFFLINE=1``.
Then it checks: the profile chosen and the 4-bit layers, a falling loss, peak memory within the profile's budget,
CUDA still uninitialised at notebook 03's ``notebook_launcher`` cell, the merged model on disk, and generation
stopping at EOS. It prints one table; the exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import RUNS_DIR  # noqa: E402

WORK_DIR = RUNS_DIR / "gpu_check"


def build_model(cuda: bool, folder: Path) -> Path:
    """A Mistral-7B-shaped folder with random bf16 weights and the embedded tokenizer (the tiny model when dry)."""
    from utils.assets import ensure_tiny_model, load_tokenizer

    if not cuda:
        return ensure_tiny_model()
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = MistralForCausalLM(MistralConfig())  # MistralConfig's defaults are Mistral-7B-v0.1's shape
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def text_of(executed: Path) -> str:
    nb = json.loads(executed.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))


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


def run_checks(dry_run: bool, steps: int, work: Path) -> list[tuple[str, bool, str]]:
    import torch

    from utils.hardware import choose_profile
    from utils.notebook_runner import notebooks, run_notebook

    os.environ["HF_HUB_OFFLINE"] = "1"
    cuda = torch.cuda.is_available() and not dry_run
    if work.exists():
        shutil.rmtree(work)  # our own folder (runs/gpu_check or --work), written by the previous check
    work.mkdir(parents=True)
    model_dir = build_model(cuda, work / "mistral-7b-random")
    profile = choose_profile("auto" if cuda else "smoke", model=str(model_dir), verbose=False)
    requested = "auto" if cuda else "smoke"
    executed = work / "executed"
    nb = {p.name[:2]: p for p in notebooks(["02", "03", "05"])}
    checks: list[tuple[str, bool, str]] = []

    start = time.perf_counter()
    out02 = text_of(
        run_notebook(
            nb["02"],
            requested,
            executed,
            progress_bar=False,
            MODEL=str(model_dir),
            OUTPUT_DIR=str(work / "qlora"),
            MAX_STEPS=steps,
            FRESH=True,
        )
    )
    out03 = text_of(
        run_notebook(
            nb["03"],
            requested,
            executed,
            progress_bar=False,
            MODEL=str(model_dir),
            OUTPUT_DIR=str(work / "full"),
            SMOKE_STEPS=0,
            FRESH=True,
        )
    )
    out05 = text_of(run_notebook(nb["05"], requested, executed, progress_bar=False, RUNS=str(work), MAX_NEW_TOKENS=32))
    minutes = (time.perf_counter() - start) / 60

    line = next((ln for ln in out02.splitlines() if ln.startswith("Profile: ")), "")
    checks.append(("profile", line.startswith(f"Profile: {profile.name} "), line[:110]))
    layers = 7 * (32 if cuda else 4)
    checks.append(("4-bit layers", f"{layers} linear layers are 4-bit" in out02, f"{layers} expected"))
    history = json.loads((work / "qlora" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    checks.append(("loss falls", last < first, f"{first:.3f} -> {last:.3f} over {len(losses)} logged steps"))
    speed = json.loads((work / "qlora" / "speed.json").read_text())
    peak = speed.get("peak_gpu_memory_gib")
    if cuda:
        ok = peak is not None and peak <= profile.min_gpu_memory_gib
        checks.append(("peak memory", ok, f"{peak} GiB allocated, budget {profile.min_gpu_memory_gib} GiB"))
    else:
        checks.append(("peak memory", True, "no GPU (dry run)"))
    cuda_line = "CUDA initialised before notebook_launcher: False"
    checks.append(("CUDA uninitialised at notebook_launcher", cuda_line in out03, cuda_line))
    merged = work / "qlora" / "merged" / "model.safetensors"
    merge_ok = merged.is_file() and "merged vs 16-bit base + adapter" in out02
    checks.append(("adapter merged", merge_ok, str(merged)))
    match = re.search(r"qlora \(merged\): (\d) of 4 answers ended at EOS", out05)
    checks.append(("notebook 05 sampled", match is not None, match.group(0) if match else "no answers"))
    ok, detail = eos_stop(merged.parent, cuda)
    checks.append(("generation stops at EOS", ok, detail))
    checks.append(("time", minutes < 8 or not cuda, f"{minutes:.1f} min for the three notebooks"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU, as CI runs it")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 30 on a GPU, 6 dry)")
    parser.add_argument("--work", default=str(WORK_DIR), help="folder for the model and runs (replaced)")
    parser.add_argument("--json", default=None, help="also write the checks here")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU; run with --dry-run to check the same steps on the CPU", file=sys.stderr)
        return 2
    work = Path(args.work)
    if work.exists() and not (work / "executed").is_dir() and any(work.iterdir()):
        print(f"error: {work} holds files this check did not write; choose another --work", file=sys.stderr)
        return 2
    device = "CPU (dry run: tiny model)" if args.dry_run else torch.cuda.get_device_name(0)
    checks = run_checks(args.dry_run, args.steps or (6 if args.dry_run else 30), work)
    print(f"\nGPU path check on {device}")
    print(f"{'check':42s} {'result':6s} detail")
    for name, ok, detail in checks:
        print(f"{name:42s} {'ok' if ok else 'FAILED':6s} {detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "checks": checks}, indent=2))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
