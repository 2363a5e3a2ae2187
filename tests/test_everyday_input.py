"""Everyday use, tried again (issue 26): inputs that used to pass silently get a clear answer,
and `actsteer --version` says what is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import actsteer
from actsteer import ActSteerError


def test_the_version_is_one_flag_away():
    run = subprocess.run(
        [sys.executable, "-c", "from actsteer.cli import app; app()", "--version"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == f"actsteer {actsteer.__version__}"


def test_an_empty_module_list_is_refused_not_the_default(tiny_llama, tokenizer, neutral, football):
    with pytest.raises(ActSteerError, match="names no module .*empty list"):
        actsteer.fit(tiny_llama, tokenizer, neutral[:8], football[:8], modules=[])


def test_source_and_target_alike_are_refused(tiny_llama, tokenizer, neutral):
    with pytest.raises(ActSteerError, match="the same texts: a steering between them moves"):
        actsteer.fit(tiny_llama, tokenizer, neutral[:8], list(reversed(neutral[:8])))
