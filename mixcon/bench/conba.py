"""`mixcon bench conba`: the Conba scan benchmark (Triton kernels against the PyTorch paths).

Its code is in the repository's ``tools/bench_conba.py`` (its owner is moving the Triton work); until it
moves into the package, this module runs that file's ``main`` from a source checkout (an editable
install), and says so from a wheel install.
"""

from __future__ import annotations

import importlib.util
import os

from mixcon.resources import PACKAGE_DIR, UsageError

SOURCE = os.path.join(os.path.dirname(PACKAGE_DIR), "tools", "bench_conba.py")


def main(argv=None):
    if not os.path.exists(SOURCE):
        raise UsageError("mixcon bench conba needs the repository checkout (tools/bench_conba.py): install with "
                         "`pip install -e <repository>` to run it")
    spec = importlib.util.spec_from_file_location("mixcon_tools_bench_conba", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
