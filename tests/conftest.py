"""Fixtures shared by every test file; helpers to import live in ``tests/testkit.py``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from testkit import make_unet  # noqa: E402


@pytest.fixture
def unet():
    """A tiny SD-shaped UNet (see :func:`testkit.make_unet`)."""
    return make_unet()
