"""The README's Python example runs as printed."""
import os
import re

from conftest import ROOT


def test_readme_python_block_runs(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        env = {}
        exec(compile(code, "README.md", "exec"), env)
    assert os.path.exists(tmp_path / "cache.kmvs")
    assert env["row"].shape == (8,) and env["y"].shape == (256,)
