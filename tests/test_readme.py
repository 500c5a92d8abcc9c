import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(# runnable\n.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_examples():
    assert BLOCKS, "the README's Python API example must be marked '# runnable'"


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_python_examples_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert os.path.exists("my_table.safetensors") and os.path.isdir("my_pipeline")


def test_readme_commands_exist():
    text = README.read_text()
    assert "condvec-train configs/quickstart.yaml" in text and "python -m pytest -q" in text
    root = README.parent
    for config in re.findall(r"configs/[\w.-]+\.yaml", text):
        assert (root / config).exists(), config
