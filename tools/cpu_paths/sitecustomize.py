"""Force bitsandbytes' CPU path in a process a test or a benchmark starts: with ``MISTRAL_SFT_TEST_AVX512BF16=1``
every ``Linear4bit`` built afterwards believes the CPU has AVX512-BF16 (the path of AMD Zen 4/5 and Intel Sapphire
Rapids and newer), with ``=0`` that it has not. Put this folder on ``PYTHONPATH`` (``tests/helpers.cpu_path_env`` and
``bench/tiny_sft_check.py`` do): Python imports ``sitecustomize`` at start-up, and this one patches
``bitsandbytes.nn.modules.has_avx512bf16`` as that module is imported, before any model is built. The repacking that
flag enables is plain torch, so it runs on any CPU.
"""

import importlib.abc
import importlib.util
import os
import sys

FLAG = os.environ.get("MISTRAL_SFT_TEST_AVX512BF16")


class _ForceCpuPath(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.nn.modules":
            return None
        sys.meta_path.remove(self)  # find the real module, then wrap its loader
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: FLAG == "1"

        spec.loader.exec_module = exec_module
        return spec


if FLAG in ("0", "1"):
    sys.meta_path.insert(0, _ForceCpuPath())
