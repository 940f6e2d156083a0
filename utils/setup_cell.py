"""The first code cell of every notebook, kept here in one place.

    python -m utils.setup_cell        # copy SETUP_CELL into the first code cell of every notebook

Where the collection is published, and which release the cell checks out, are its two defaults below. A user can
override them without editing anything: set ``MISTRAL_SFT_REPO`` (a git address) and ``MISTRAL_SFT_REF`` (a tag or
commit) in the environment (Colab: ``%env MISTRAL_SFT_REPO=...`` in a cell above).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/mistral-sft-tutorials/mistral-7b-sft-beta.git"
REPO_REF = "v1.0.0"  # the tagged release the notebooks were tested with

SETUP_CELL = f'''# Set-up: find this collection; on Colab/Kaggle, clone it at a tagged release and install its pins.
import os, subprocess, sys  # noqa: E401
from pathlib import Path

# A fork or another release? Set MISTRAL_SFT_REPO and MISTRAL_SFT_REF first (%env in a cell above).
REPO = os.environ.get("MISTRAL_SFT_REPO", "{REPO_URL}")
REF = os.environ.get("MISTRAL_SFT_REF", "{REPO_REF}")
places = (Path.cwd(), *Path.cwd().parents, Path("mistral-sft"))
root = next((p for p in places if (p / "utils" / "setup_cell.py").is_file()), None)
cloned = root is None
if cloned:  # not inside a checkout: clone one (a re-run finds it and skips this)
    git = lambda *args: subprocess.run(["git", *args], capture_output=True).returncode == 0  # noqa: E731
    if not (git("clone", "-q", REPO, "mistral-sft") and git("-C", "mistral-sft", "checkout", "-q", REF)):
        raise SystemExit(f"Could not clone {{REPO}} at {{REF}}: set MISTRAL_SFT_REPO and MISTRAL_SFT_REF (see README).")
    root = Path("mistral-sft")
sys.path.insert(0, str(root.absolute()))
from utils.setup_cell import finish_setup  # noqa: E402

finish_setup(root, install=cloned)'''


def finish_setup(root: Path, install: bool) -> None:
    """The rest of the first cell: install the pinned packages into a fresh clone (keeping the platform's torch),
    work from the collection's folder, put the kernel's scripts (torchrun) on the PATH, and print the commit."""
    root = root.absolute()
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


def write(notebooks=None) -> int:
    """Put SETUP_CELL into the first code cell of each notebook; return how many changed."""
    import nbformat

    from tools.notebook_runner import notebooks as all_notebooks

    changed = 0
    for path in notebooks or all_notebooks():
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code")
        if cell.source != SETUP_CELL:
            cell.source = SETUP_CELL
            nbformat.write(nb, path)
            changed += 1
    return changed


if __name__ == "__main__":
    print(f"updated {write()} notebook(s)")
    sys.exit(0)
