"""Run the notebooks top to bottom with papermill: ``make tutorial`` (or ``python -m tools.notebook_runner``).

Executed copies go to ``runs/executed/``; the first failing cell stops the run with a non-zero exit and a line
naming the notebook and the cell. What a learner reads there is kept clean: progress bars are plain text (an
IPython start-up file in the kernel's own profile folder swaps tqdm's widgets for text) and each ends as one final
line, and consecutive prints of a cell are one output.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
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


# Runs in the kernel before the first cell: text progress bars instead of widgets, whose stored form is "0/39".
TEXT_PROGRESS = """import tqdm.auto, tqdm.autonotebook, tqdm.std
tqdm.auto.tqdm = tqdm.autonotebook.tqdm = tqdm.std.tqdm
tqdm.auto.trange = tqdm.autonotebook.trange = tqdm.std.trange
"""


def run_notebook(
    path: Path, profile: str = "auto", out_dir: Path = EXECUTED_DIR, progress_bar: bool = True, **parameters
) -> Path:
    """Execute one notebook with ``PROFILE=profile`` (and any other parameters); return the executed copy's path."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    with tempfile.TemporaryDirectory() as ipython_dir:
        startup = Path(ipython_dir) / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-text-progress.py").write_text(TEXT_PROGRESS)
        saved = os.environ.get("IPYTHONDIR")
        os.environ["IPYTHONDIR"] = ipython_dir  # the kernel inherits it
        try:
            papermill.execute_notebook(
                str(path),
                str(out),
                parameters={"PROFILE": profile, **parameters},
                cwd=str(REPO_ROOT),
                kernel_name="python3",
                progress_bar=progress_bar,
                log_output=False,
                # ipykernel 7.4 warns on every start that its local TCP socket is unencrypted: nothing a learner can
                # act on (the kernel listens on 127.0.0.1 only); its errors still show
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
        finally:
            tidy(out)
            if saved is None:
                os.environ.pop("IPYTHONDIR", None)
            else:
                os.environ["IPYTHONDIR"] = saved
    return out


_BAR_LINE = re.compile(r"\r(?!\n)")


def printed_text(executed: Path) -> str:
    """Everything an executed notebook's cells printed (their stream outputs), in order."""
    import json

    cells = json.loads(Path(executed).read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))


def tidy(executed: Path) -> None:
    """Merge consecutive stream outputs of a cell and keep only each progress bar's last state (the text after its
    last carriage return), as a terminal would show it."""
    import nbformat

    if not executed.is_file():
        return
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for output in cell.outputs:
            last = merged[-1] if merged else None
            if (
                output.output_type == "stream"
                and last is not None
                and last.output_type == "stream"
                and last.name == output.name
            ):
                last.text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = "\n".join(
                    _BAR_LINE.split(line)[-1] if "\r" in line else line
                    for line in output.text.replace("\r\n", "\n").split("\n")
                )
        cell.outputs = [o for o in merged if o.output_type != "stream" or o.text.strip()]
    nbformat.write(nb, executed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.notebook_runner", description=__doc__.split("\n\n")[0])
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
            print(
                f"FAILED: {path.name}, cell {exc.cell_index} (execution count {exc.exec_count}): "
                f"{exc.ename}: {exc.evalue}\n  executed copy: {EXECUTED_DIR / path.name}",
                file=sys.stderr,
            )
            return 1
        print(f"      done in {time.perf_counter() - t0:.0f} s -> {out.relative_to(REPO_ROOT)}", flush=True)
    print(f"All {len(todo)} notebooks ran in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
