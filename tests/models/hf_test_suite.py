"""transformers' own common test files, taken from the installed version's source distribution.

Nothing of transformers' is kept in this repository: ``pip download --no-binary :all:`` fetches
``transformers==<installed version>``'s sdist from the package registry into a cache directory
(``$MIXCON_HF_TESTS_CACHE``, default ``~/.cache/mixcon/transformers-tests``), its ``tests/`` folder
is extracted there as the package ``transformers_tests`` (the files import each other relatively),
and test_hf_common.py imports ModelTesterMixin, GenerationTesterMixin and ConfigTester from it.
``$MIXCON_HF_TESTS_SRC`` may point at a transformers source checkout's ``tests/`` folder instead.

The sdist ships ``tests/*.py`` but not every sub-folder the common files import. The two the
generation tests need, ``tests/generation/test_utils.py`` (GenerationTesterMixin) and
``tests/exporters/test_export.py``, are fetched from transformers' repository at the installed version's
release tag (`UPSTREAM`, into the same cache) where it can be reached; where it cannot, each is replaced
by an empty mixin that says so (`MISSING` lists them, `NOT_FETCHED` why; the test module reports them as
skips; ``MIXCON_HF_TESTS_OFFLINE=1`` does not try the network). The missing
``tests/utils/test_configuration_utils.py`` (a dict of non-default values for the base config's
fields) by `COMMON_CONFIG_KWARGS` below. transformers' generation tests import
``tests.exporters.test_export`` by its checkout name: ``tests`` is aliased to the package here.

    python tests/models/hf_test_suite.py     # fetch now (tools/setup.sh dev does this)
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types

PKG = "transformers_tests"
MISSING: list[str] = []  # transformers test files the sdist does not ship (stand-ins used)
NOT_FETCHED: list[str] = []  # why the release tag's copies of them could not be had

# Non-default values of PretrainedConfig's own fields, for ConfigTester.check_config_arguments_init
# (a config must keep what it is given for the fields every config has).
COMMON_CONFIG_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["MixConForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _version() -> str:
    import transformers

    return transformers.__version__


def cache_dir() -> str:
    root = os.environ.get("MIXCON_HF_TESTS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mixcon",
                                                                  "transformers-tests"))
    return os.path.join(root, _version())


def fetch() -> str:
    """The folder holding the ``transformers_tests`` package, downloading the sdist once."""
    src = os.environ.get("MIXCON_HF_TESTS_SRC")
    if src:
        parent = tempfile.mkdtemp(prefix="mixcon-hf-tests-")
        os.symlink(os.path.abspath(src), os.path.join(parent, PKG))
        return parent
    root = cache_dir()
    if os.path.exists(os.path.join(root, PKG, "test_modeling_common.py")):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=os.path.dirname(root))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={_version()}", "-d", tmp], check=True)
        (sdist,) = glob.glob(os.path.join(tmp, "transformers-*.tar.gz"))
        out = os.path.join(tmp, "out", PKG)
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if len(parts) >= 3 and parts[1] == "tests" and m.isfile() and m.name.endswith(".py"):
                    dest = os.path.join(out, *parts[2:])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with tar.extractfile(m) as f, open(dest, "wb") as g:
                        g.write(f.read())
        for d, _, files in os.walk(out):  # every folder a package (the files import relatively)
            if "__init__.py" not in files:
                open(os.path.join(d, "__init__.py"), "w").close()
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, PKG)
        if not os.path.exists(final):
            os.rename(out, final)  # atomic: a half-extracted tree is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# transformers' own files at the installed version's release tag (the sdist does not ship them)
UPSTREAM = "https://raw.githubusercontent.com/huggingface/transformers/v{version}/tests/{path}"
FROM_TAG = ("generation/test_utils.py", "exporters/test_export.py")


def fetch_from_tag(root: str, timeout: float = 20.0) -> list[str]:
    """The `FROM_TAG` files missing under ``root/transformers_tests``, downloaded from the release tag of
    the installed version (each written whole or not at all). Returns what could not be had, with why."""
    import urllib.request

    failed = []
    for path in FROM_TAG:
        dest = os.path.join(root, PKG, *path.split("/"))
        if os.path.exists(dest):
            continue
        url = UPSTREAM.format(version=_version(), path=path)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                body = r.read()
        except Exception as exc:  # noqa: BLE001 - offline, or no such tag: the stand-ins say so
            failed.append(f"{path} ({type(exc).__name__} from {url})")
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        init = os.path.join(os.path.dirname(dest), "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
        tmp = dest + ".part"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, dest)
    return failed


def _stub(name: str, **attrs) -> None:
    mod = types.ModuleType(f"{PKG}.{name}")
    mod.__dict__.update(attrs)
    sys.modules[mod.__name__] = mod
    parent, _, child = mod.__name__.rpartition(".")
    if parent not in sys.modules:
        pkg = types.ModuleType(parent)
        pkg.__path__ = []
        sys.modules[parent] = pkg
    setattr(sys.modules[parent], child, mod)


def load():
    """→ (test_modeling_common, test_configuration_common, GenerationTesterMixin) modules/classes."""
    root = fetch()
    if not os.environ.get("MIXCON_HF_TESTS_SRC") and os.environ.get("MIXCON_HF_TESTS_OFFLINE") != "1":
        NOT_FETCHED.extend(fetch_from_tag(root))
    if root not in sys.path:
        sys.path.insert(0, root)
    base = os.path.join(root, PKG)
    importlib.import_module(PKG)
    if not os.path.exists(os.path.join(base, "utils", "test_configuration_utils.py")):
        _stub("utils.test_configuration_utils", config_common_kwargs=COMMON_CONFIG_KWARGS)
    if not os.path.exists(os.path.join(base, "exporters", "test_export.py")):
        MISSING.append("tests/exporters/test_export.py (ExportTesterMixin)")
        export_mixin = type("ExportTesterMixin", (), {})
        _stub("exporters.test_export", ExportTesterMixin=export_mixin,
              ExportGenerateTesterMixin=type("ExportGenerateTesterMixin", (export_mixin,), {}))
    # transformers' generation tests import ``tests.exporters.test_export`` by its absolute name (the
    # name of the folder in a source checkout): the same module, not a second copy of it
    if "tests" not in sys.modules:
        export = importlib.import_module(f"{PKG}.exporters.test_export")
        sys.modules["tests"], sys.modules["tests.exporters"] = sys.modules[PKG], sys.modules[f"{PKG}.exporters"]
        sys.modules["tests.exporters.test_export"] = export
    has_generation = os.path.exists(os.path.join(base, "generation", "test_utils.py"))
    if not has_generation:
        MISSING.append("tests/generation/test_utils.py (GenerationTesterMixin)")
        _stub("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    modeling = importlib.import_module(f"{PKG}.test_modeling_common")
    configuration = importlib.import_module(f"{PKG}.test_configuration_common")
    generation = importlib.import_module(f"{PKG}.generation.test_utils")
    return modeling, configuration, generation.GenerationTesterMixin, has_generation


if __name__ == "__main__":
    where = fetch()
    for line in fetch_from_tag(where):
        print("not fetched (its tests will be reported as skipped):", line, file=sys.stderr)
    print(where)
