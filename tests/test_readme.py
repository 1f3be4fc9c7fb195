"""Every Python block of the README runs as written (in a temporary directory)."""

import os
import re

import pytest

from helpers import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    for comment in re.findall(r"print\(.*\)\s+# (torch\.Size\(\[[0-9, ]+\]\)|[0-9.]+B parameters)", BLOCKS[i]):
        assert comment in out, (comment, out)  # the printed values the README promises
