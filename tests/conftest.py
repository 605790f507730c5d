"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The shared GGUF golden fixtures: $GEMMA4_JAX_FIXTURES or the repo's sibling
    `shared/fixtures`. Skips the test when neither exists."""
    env = os.environ.get("GEMMA4_JAX_FIXTURES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    if not path.is_dir():
        pytest.skip(f"GGUF fixtures not found at {path} (set GEMMA4_JAX_FIXTURES)")
    return path
