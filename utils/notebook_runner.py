"""Run the notebooks top to bottom with papermill: ``make tutorial`` (or ``python -m utils.notebook_runner``).

Executed copies go to ``runs/executed/``; the first failing cell stops the run with a non-zero exit and a line
naming the notebook and the cell.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from utils import REPO_ROOT, RUNS_DIR

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
EXECUTED_DIR = RUNS_DIR / "executed"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order, optionally only those whose number or name starts with ``only``."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.name.startswith(prefix) for prefix in only)]
    return found


def run_notebook(path: Path, profile: str = "auto", out_dir: Path = EXECUTED_DIR, **parameters) -> Path:
    """Execute one notebook with ``PROFILE=profile`` (and any other parameters); return the executed copy's path."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    papermill.execute_notebook(
        str(path), str(out), parameters={"PROFILE": profile, **parameters}, cwd=str(REPO_ROOT),
        kernel_name="python3", progress_bar=True, log_output=False,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.notebook_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="auto", help="PROFILE passed to every notebook (auto, smoke, ...)")
    parser.add_argument("--only", nargs="*", help="run only notebooks starting with these prefixes, e.g. 01 02")
    args = parser.parse_args(argv)

    from papermill.exceptions import PapermillExecutionError

    todo = notebooks(args.only)
    if not todo:
        print(f"error: no notebooks match {args.only} in {NOTEBOOKS_DIR}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    for i, path in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {path.name}", flush=True)
        t0 = time.perf_counter()
        try:
            out = run_notebook(path, args.profile)
        except PapermillExecutionError as exc:
            print(f"FAILED: {path.name}, cell {exc.cell_index} (execution count {exc.exec_count}): "
                  f"{exc.ename}: {exc.evalue}\n  executed copy: {EXECUTED_DIR / path.name}", file=sys.stderr)
            return 1
        print(f"      done in {time.perf_counter() - t0:.0f} s -> {out.relative_to(REPO_ROOT)}", flush=True)
    print(f"All {len(todo)} notebooks ran in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
