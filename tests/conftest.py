"""Shared test fixtures. Paths to the vendored data; the repo's own copy, never ../shared at run time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "subq" / "data"
SUBQ_DIR = DATA / "gsm8k-ai-subq"
RAW_TEST = SUBQ_DIR / "qg_test_data_raw.jsonl"
DATASET_TEST = SUBQ_DIR / "qg_test_dataset.jsonl"
CHAT_TEST = SUBQ_DIR / "test_chat.jsonl"
SUBQ_BIN = str(Path(sys.executable).parent / "subq")

# Tests must never reach a real provider with a real key.
os.environ.pop("OPENAI_API_KEY", None)


@pytest.fixture
def subq_bin() -> str:
    """The installed `subq` console script of this interpreter's environment."""
    return SUBQ_BIN
