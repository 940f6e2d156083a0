"""The first code cell of every notebook, kept here in one place (``utils.setup.finish_setup`` does the rest).

    python -m tools.setup_cell        # copy SETUP_CELL into the first code cell of every notebook

Where the collection is published, and which release the cell checks out, are its two defaults below. A user can
override them without editing anything: set ``MISTRAL_SFT_REPO`` (a git address) and ``MISTRAL_SFT_REF`` (a tag or
branch) in the environment (Colab: ``%env MISTRAL_SFT_REPO=...`` in a cell above).
"""

from __future__ import annotations

import sys

REPO_URL = "https://github.com/mistral-sft-tutorials/mistral-7b-sft-beta.git"
REPO_REF = "v1.0.0"  # the tagged release the notebooks were tested with

SETUP_CELL = f'''import os, subprocess, sys  # noqa: E401 - find this collection, or clone it (Colab, Kaggle)

REPO = os.environ.get("MISTRAL_SFT_REPO", "{REPO_URL}")
REF = os.environ.get("MISTRAL_SFT_REF", "{REPO_REF}")  # a fork, another tag or branch: set them first (%env above)
places = [os.getcwd(), os.path.dirname(os.getcwd()), os.path.abspath("mistral-sft")]
root = next((p for p in places if os.path.isfile(os.path.join(p, "utils", "setup.py"))), None)
if root is None and subprocess.run(["git", "clone", "-q", "-b", REF, REPO, places[-1]], capture_output=True).returncode:
    raise SystemExit(f"Could not clone {{REPO}} at {{REF}}: set MISTRAL_SFT_REPO and MISTRAL_SFT_REF (see README).")
sys.path.insert(0, root or places[-1])
__import__("utils.setup").setup.finish_setup(root or places[-1], install=root is None)  # pins, folder, commit'''


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
