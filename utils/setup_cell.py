"""The first code cell of every notebook, kept here in one place.

    python -m utils.setup_cell        # copy SETUP_CELL into the first code cell of every notebook

Where the collection is published, and which release the cell checks out, are its two defaults below. A user can
override them without editing anything: set ``MISTRAL_SFT_REPO`` (a git address) and ``MISTRAL_SFT_REF`` (a tag or
commit) in the environment (Colab: ``%env MISTRAL_SFT_REPO=...`` in a cell above).
"""

from __future__ import annotations

import sys

REPO_URL = "https://github.com/mistral-sft-tutorials/mistral-7b-sft-beta.git"
REPO_REF = "v1.0.0"  # the tagged release the notebooks were tested with

SETUP_CELL = f'''# Set-up: find this collection; on Colab/Kaggle clone it at a tagged release and install its pins.
# Published elsewhere? Set MISTRAL_SFT_REPO (git address) and MISTRAL_SFT_REF (tag or commit) first, e.g. with
# %env MISTRAL_SFT_REPO=https://github.com/you/fork.git in a cell above this one.
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = os.environ.get("MISTRAL_SFT_REPO", "{REPO_URL}")
REF = os.environ.get("MISTRAL_SFT_REF", "{REPO_REF}")


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True).returncode == 0


here = Path.cwd()
places = [here, *here.parents, here / "mistral-sft"]
root = next((p for p in places if (p / "utils" / "prepare_data.py").is_file()), None)
if root is None:  # not inside a checkout: clone one (a re-run finds it and skips this)
    if not (git("clone", "--quiet", REPO, "mistral-sft") and git("-C", "mistral-sft", "checkout", "--quiet", REF)):
        raise SystemExit(f"Could not clone {{REPO}} at {{REF}}: set MISTRAL_SFT_REPO and MISTRAL_SFT_REF (see README).")
    root = Path("mistral-sft").resolve()
    before = {{name: installed(name) for name in ("numpy", "pyarrow")}}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")], check=True)
    if {{name: installed(name) for name in before}} != before:  # Colab/Kaggle imported the old ones already
        raise SystemExit("numpy or pyarrow changed: restart the runtime (Colab: Runtime > Restart session), run again.")
os.chdir(root)
sys.path.insert(0, str(root))
os.environ["PATH"] = f"{{Path(sys.executable).parent}}{{os.pathsep}}{{os.environ['PATH']}}"  # torchrun in shell cells
print("collection at", root)'''


def write(notebooks=None) -> int:
    """Put SETUP_CELL into the first code cell of each notebook; return how many changed."""
    import nbformat

    from utils.notebook_runner import notebooks as all_notebooks

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
