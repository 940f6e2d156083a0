"""`make lab` starts a real JupyterLab (as root too, as on cloud GPU containers) that serves the notebooks."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from utils import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a server on this machine
        return json.loads(response.read())


def test_make_lab_serves_the_notebooks():
    port, token = _free_port(), "test-token-not-secret"
    args = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --IdentityProvider.token={token}"
    lab = subprocess.Popen(
        ["make", "--no-print-directory", "lab", f"LAB_ARGS={args}"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/api/contents/notebooks"
    try:
        deadline = time.time() + 90
        while True:
            assert lab.poll() is None, lab.stdout.read()[-3000:]  # e.g. "Running as root is not recommended"
            try:
                listing = _get(f"{base}?token={token}")
                break
            except OSError:
                assert time.time() < deadline, "JupyterLab did not answer in 90 s"
                time.sleep(0.5)
        names = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        assert names == sorted(p.name for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        opened = _get(f"{base}/{names[0]}?token={token}&content=1")
        assert opened["type"] == "notebook" and opened["content"]["cells"][0]["cell_type"] == "markdown"
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()
