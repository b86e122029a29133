"""Shared pytest setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it
is set here, at collection start, whenever no CUDA GPU is visible.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import sys
from pathlib import Path

import pytest
import torch

# examples/seed_models.py holds the seed documents' classes verbatim: the oracles.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
