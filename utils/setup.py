"""The rest of every notebook's first cell (``tools/setup_cell.SETUP_CELL``), once it has found or cloned the
collection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def finish_setup(root: str | Path, install: bool) -> None:
    """The rest of the first cell: install the pinned packages into a fresh clone (keeping the platform's torch),
    work from the collection's folder, put the kernel's scripts (torchrun) on the PATH, and print the commit."""
    root = Path(root).absolute()
    if install:
        before = {name: _installed(name) for name in ("numpy", "pyarrow")}
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")], check=True)
        if {name: _installed(name) for name in before} != before:  # Colab/Kaggle imported the old ones already
            raise SystemExit(
                "numpy or pyarrow changed: restart the runtime (Colab: Runtime > Restart session) and run again."
            )
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # torchrun in shell cells
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = done.stdout.strip() if done.returncode == 0 else ""  # a tag can move; the commit cannot
    print("collection at", root, f"(commit {commit})" if commit else "(not a git checkout)")


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
