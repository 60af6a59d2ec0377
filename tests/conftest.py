"""Fixtures shared by several test modules; plain helpers are in ``helpers.py``.

Markers (declared in ``pyproject.toml``): ``slow`` for the long end-to-end tests (real
subprocesses, ``torchrun``, the sample runs), ``gpu`` for the tests that need CUDA (they
skip without it).  ``make test-quick`` runs ``pytest -m "not slow"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: the committed sample runs (``sample_data/README.md``)
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"


@pytest.fixture(scope="session")
def sample_manifest() -> dict:
    """``sample_data/runs.json``: every run's arch, loss, data file and checkpoints."""
    path = SAMPLE_DATA / "runs.json"
    if not path.is_file():
        pytest.skip("sample_data/ not present")
    return json.loads(path.read_text())
