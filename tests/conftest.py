"""Shared fixtures. Tests run offline, on the CPU, on the embedded default, in two worker processes (pytest-xdist).

The cached assets every test reads (the converted tokenizer, the tiny model, the prepared smoke data) are built
once, before the workers start, so that no two workers build them at the same moment.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two workers share two cores: one thread each (inherited by the notebooks and commands they start) instead of four
# threads fighting over two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc gives every freed block over 128 KiB back to the kernel, and the next step maps it anew, a page fault for each
# 4 KiB: a smoke step's logits (32,000 floats a token: 33 MB a row of 256, several copies forward and backward) were
# faulted in again at every step, as much system time as the training's own. Freed memory stays in the process
# instead (the heap, never mmap; given back past 512 MiB free at its top). Read when a process starts: the workers,
# the kernels and the commands the tests start inherit it from here; the Makefile sets it for the first process.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=536870912")

import pytest  # noqa: E402

# The files that run notebooks or train to the end of the data, longest first (`pytest --durations=0`, recorded in
# docs/benchmarks.md). `make test` hands whole files to its two workers in collection order
# (--no-loadscope-reorder): started first, no long file is left to run alone while the other worker idles.
LONGEST_FIRST = ("test_notebooks.py", "test_try_this.py", "test_sft.py", "test_card_training.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a worker: the controller has built the assets already
        return
    from utils.assets import ensure_tiny_model, load_tokenizer
    from utils.data.prepared import prepared_dataset
    from utils.hardware import SMOKE

    ensure_tiny_model()
    prepared_dataset(SMOKE.dataset, load_tokenizer(None))  # the smoke runs' data, cached under runs/data/


@pytest.fixture(scope="session")
def tokenizer():
    from utils.assets import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture
def command_env() -> dict:
    """The environment of a learner's terminal in the collection: utils importable, offline, the venv's tools first."""
    import sys

    from utils import REPO_ROOT

    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "PATH": path}


@pytest.fixture
def private_data_cache(tmp_path, monkeypatch):
    """Prepared copies of a test's own temporary sources go under tmp_path, not the checkout's runs/data/."""
    from utils.data import prepared

    monkeypatch.setattr(prepared, "DATA_CACHE", tmp_path / "data_cache")
    return tmp_path / "data_cache"


@pytest.fixture(autouse=True)
def _log_handlers_on_live_streams():
    """A library that adds its log handler while a test captures stderr (transformers, on first use) keeps that
    capture's stream, closed after the test: a later log line would print "--- Logging error ---" into another test's
    output. Each test starts with such handlers pointed at the stderr of the moment."""
    import logging
    import sys

    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if hasattr(lg, "handlers")),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                with handler.lock:  # not setStream: it flushes the old stream first, which raises once it is closed
                    handler.stream = sys.stderr
    yield
