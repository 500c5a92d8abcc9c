import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]
BLOCKS = [block for page in DOCS for block in re.findall(r"```python\n(# runnable\n.*?)```", page.read_text(),
                                                         flags=re.S)]


def test_readme_has_runnable_examples():
    assert BLOCKS, "the README's Python API example must be marked '# runnable'"


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_python_examples_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(README.parent / "tests"))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    written = sorted(p.name for p in Path(".").glob("my_*"))
    assert written, "a runnable README example must save what it builds (my_table.safetensors, my_pipeline, …)"
    for name in written:
        assert Path(name).is_dir() or Path(name).stat().st_size > 0


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes"
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_commands_exist():
    text = README.read_text()
    assert "condvec-train configs/quickstart.yaml" in text and "python -m pytest -q" in text
    root = README.parent
    for config in re.findall(r"configs/[\w.-]+\.yaml", text):
        assert (root / config).exists(), config


MAKEFILE = README.parent / "Makefile"
_STUB_PYTHON = """#!/bin/sh
echo "$@" >> "$LOG"
case "$*" in
  *"import torch"*) if [ -n "$HAS_TORCH" ]; then echo 2.13.0+cu128; exit 0; else exit 1; fi ;;
esac
exit 0
"""


def test_readme_two_commands_are_make_targets_that_run_the_documented_commands():
    text = README.read_text()
    block = re.search(r"## The two commands\n\n```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make quickstart", "make test"]
    makefile = MAKEFILE.read_text()
    assert re.search(r"^quickstart: setup\n\t\$\(BIN\)/python -m demo.data runs/data/quickstart-concepts .*\n.*\n"
                     r"\t\$\(BIN\)/condvec-train configs/quickstart.yaml", makefile, flags=re.M)
    assert re.search(r"^test: setup\n\tHF_HUB_OFFLINE=1 \$\(BIN\)/python -m pytest -q", makefile, flags=re.M)
    ci = (README.parent / ".ci" / "run").read_text()
    assert re.search(r"^make test VENV=\S+$", ci, flags=re.M) and re.search(r"^make lint VENV=\S+$", ci, flags=re.M)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("has_torch", [True, False])
def test_setup_installs_cpu_torch_only_when_the_venv_has_none(tmp_path, has_torch):
    """An existing torch (e.g. a CUDA build) is never replaced; a venv without one gets the CPU build."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(_STUB_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "LOG": str(log), "HAS_TORCH": "1" if has_torch else ""}
    result = subprocess.run(["make", "-C", str(README.parent), "setup", f"VENV={venv}"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    torch_installs = [c for c in calls if c.startswith("-m pip install") and "torch==2.13.0" in c]
    assert torch_installs == ([] if has_torch else [
        "-m pip install -q --retries 1 torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu"])
    assert calls[-1] == "-m pip install -q -e .[dev]"
    assert (venv / ".condvec-installed").exists()
    assert ("keeping torch 2.13.0+cu128" in result.stdout) == has_torch


def test_readme_links_into_benchmarks_name_real_headings():
    """Every ``BENCHMARKS.md#anchor`` the README links to is a heading there (GitHub's slug rule)."""
    headings = (README.parent / "BENCHMARKS.md").read_text().splitlines()
    slugs = {re.sub(r"[^\w\- ]", "", h.lstrip("#").strip().lower()).replace(" ", "-") for h in headings
             if h.startswith("#")}
    anchors = re.findall(r"\]\(BENCHMARKS\.md#([^)]+)\)", README.read_text())
    assert anchors and all(a in slugs for a in anchors), sorted(set(anchors) - slugs)
