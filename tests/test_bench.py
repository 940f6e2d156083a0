"""The benchmarks run end to end on the CPU (they assert nothing about speed; the numbers go to docs/benchmarks.md)."""

import json
import subprocess
import sys

from utils import REPO_ROOT


def test_train_throughput_cpu_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    only = ["baseline", "ours + no", "ours + flex", "ours + paged", "ours + flash"]
    result = subprocess.run(
        [
            sys.executable,
            "bench/train_throughput.py",
            "--cpu-smoke",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--only",
            *only,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    ran = [name for name, r in rows.items() if "tokens/s" in r]
    assert ran == ["baseline (TRL defaults)", "ours + no checkpointing"]  # --only; the others need CUDA
    assert all(rows[name]["tokens/s"] > 0 and rows[name]["s/step"] > 0 for name in ran)
    # every variant is resolved like any run on this machine: the smoke profile's batch, the variant's own settings
    assert rows["baseline (TRL defaults)"]["batch"] == "1x1" and rows["ours + no checkpointing"]["batch"] == "1x1"
    assert result.stdout.index("warm-up (discarded): baseline") < result.stdout.index("run 1/1: baseline")
    assert rows["ours + paged 8-bit AdamW"]["skipped"] == "needs CUDA"
    assert rows["ours + flash-attn 2"]["skipped"].startswith("needs CUDA")
    assert rows["ours + flex_attention"]["skipped"].startswith("needs CUDA")
    assert "fastest:" in result.stdout and "device: CPU (smoke: tiny model)" in result.stdout


def test_variants_alternate_their_order():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from train_throughput import run_order

    assert run_order(["a", "b", "c"], 3) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
    ]


def test_train_throughput_refuses_a_cpu_without_smoke():
    code = (
        "import sys, torch; torch.cuda.is_available = lambda: False; sys.argv = ['x']; "
        "sys.path.insert(0, 'bench'); import train_throughput as t; sys.exit(t.main())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("error: no CUDA GPU; run with --cpu-smoke to exercise the script on the CPU")


def test_median_of_runs():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from train_throughput import median_result

    runs = [
        {"tokens/s": t, "s/step": 1 / t, "peak alloc GiB": m, "peak reserved GiB": m + 1}
        for t, m in ((100.0, 5.0), (300.0, 4.0), (200.0, 6.0))
    ]
    row = median_result(runs)
    assert (row["tokens/s"], row["peak alloc GiB"], row["peak reserved GiB"], row["runs"]) == (
        200.0,
        6.0,
        7.0,
        [100.0, 300.0, 200.0],
    )


def test_assistant_masks_bench_prints_both_ways():
    command = [sys.executable, "bench/assistant_masks.py", "--rows", "40", "--lists"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if " rows: " in line]
    assert [line.split()[:2] for line in lines] == [["column", "40"], ["lists", "40"]]
    assert all(line.endswith("83.2% of the tokens are the assistant's") for line in lines)  # the same masks


def test_assistant_masks_bench_refuses_no_rows():
    done = subprocess.run(
        [sys.executable, "bench/assistant_masks.py", "--rows", "0"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert (done.returncode, done.stderr.strip()) == (2, "error: --rows must be at least 1")
