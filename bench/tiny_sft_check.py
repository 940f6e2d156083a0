"""Does the embedded default's lesson hold in every seed and on both CPU paths? Notebook 02's smoke run, then notebook
05's counts, for each training seed and each of bitsandbytes' CPU paths.

    python bench/tiny_sft_check.py                                   # seeds 1 2 3, both paths: ~15 min on 2 cores
    python bench/tiny_sft_check.py --seeds 42 --paths standard --json runs/tiny_sft_check.json

Each run is ``python -m utils.sft --config configs/sft_qlora.yaml --profile smoke --seed S`` (what notebook 02 runs),
in a process whose bitsandbytes believes the CPU has AVX512-BF16 (``avx512bf16``) or has not (``standard``), whatever
this CPU has (``tools/cpu_paths``). Then, in a process on the same path, the base and the 4-bit base + adapter
answer ``utils.tiny_world.CHECK_QUESTIONS`` eight times each, with the pirate system prompt and without it
(``utils.tiny_world.check_model``, as notebook 05 does). The table has, per run and claim (``utils.tiny_world.CLAIMS``),
the questions for which it held, and the lowest (or, for the pirate voice without the prompt, highest) count of 8
over the questions: the margin. The two paths of one seed must train to the same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import REPO_ROOT, RUNS_DIR  # noqa: E402

PATHS = {"avx512bf16": "1", "standard": "0"}
CPU_PATHS = REPO_ROOT / "tools" / "cpu_paths"


def environment(path: str) -> dict:
    """This process's environment, with bitsandbytes made to take ``path`` (``tools/cpu_paths/sitecustomize.py``)."""
    python_path = os.pathsep.join(p for p in (str(CPU_PATHS), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": python_path, "MISTRAL_SFT_TEST_AVX512BF16": PATHS[path], "HF_HUB_OFFLINE": "1"}


def train(out: Path, seed: int, path: str) -> list[float]:
    """Notebook 02's smoke run with ``seed`` on ``path``; its logged training losses."""
    command = [sys.executable, "-m", "utils.sft", "--config", "configs/sft_qlora.yaml", "--profile", "smoke"]
    command += ["--output_dir", str(out), "--seed", str(seed), "--merge", "false", "--fresh", "true"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=environment(path), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training failed (seed {seed}, {path}): {(done.stderr or done.stdout).strip()[-500:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def count(adapter: Path | None, path: str) -> dict:
    """``check_model`` on the base (``adapter`` None) or the 4-bit base + ``adapter``, in a process on ``path``."""
    done = subprocess.run(
        [sys.executable, __file__, "--count", str(adapter or "base")],
        cwd=REPO_ROOT,
        env=environment(path),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"counting failed ({adapter}, {path}): {(done.stderr or done.stdout).strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def count_here(ref: str) -> dict:
    """What ``count`` runs in its own process: per mode, per question, the four counts."""
    from utils import sampling
    from utils.assets import ensure_tiny_model, load_tokenizer
    from utils.hardware import SMOKE
    from utils.tiny_world import check_model

    model = sampling.load_for_sampling(str(ensure_tiny_model()) if ref == "base" else ref, SMOKE)
    results = check_model(model, load_tokenizer(None))
    return {
        mode: {c.question: {k: getattr(c, k) for k in ("stops", "pirate", "about", "clean")} for c in checks}
        for mode, checks in results.items()
    }


def claims(counts: dict) -> dict[str, tuple[int, int, int]]:
    """Per claim of ``utils.tiny_world.CLAIMS``: (questions where it held, questions, the worst count of 8)."""
    from utils.tiny_world import CLAIMS

    found = {}
    for claim, (mode, measure, sign, bound) in CLAIMS.items():
        values = [q[measure] for m, questions in counts.items() if mode in (None, m) for q in questions.values()]
        held = [v >= bound if sign == ">=" else v <= bound for v in values]
        worst = min(values) if sign == ">=" else max(values)
        found[claim] = (sum(held), len(held), worst)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/tiny_sft_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--work", type=Path, default=RUNS_DIR / "tiny_sft_check", help="folder for the runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--count", help=argparse.SUPPRESS)  # the counting process (see count)
    args = parser.parse_args(argv)
    if args.count:
        print(json.dumps(count_here(args.count)))
        return 0
    if args.json and not args.json.parent.is_dir():
        print(f"error: --json {args.json}: its folder does not exist", file=sys.stderr)
        return 2
    results: dict = {"base": claims(count(None, args.paths[0])), "runs": []}
    print(f"{'run':24s} " + " | ".join(f"{c}" for c in results["base"]))
    print(f"{'base':24s} " + " | ".join(f"{h}/{n} (worst {w}/8)" for h, n, w in results["base"].values()))
    failed = False
    for seed in args.seeds:
        losses = {}
        for path in args.paths:
            out = args.work / f"seed{seed}-{path}"
            losses[path] = train(out, seed, path)
            counts = count(out / "adapter", path)
            found = claims(counts)
            failed |= any(h < n for h, n, _ in found.values())
            results["runs"].append({"seed": seed, "path": path, "claims": found, "counts": counts})
            print(f"{f'seed {seed}, {path}':24s} " + " | ".join(f"{h}/{n} (worst {w}/8)" for h, n, w in found.values()))
        same = len({json.dumps(v) for v in losses.values()}) == 1
        failed |= not same
        print(f"{'':24s} the paths' training losses are {'the same' if same else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
