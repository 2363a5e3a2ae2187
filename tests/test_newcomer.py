"""A newcomer adds an estimator (one new file in `actsteer/methods/`) or an evaluation task (one
new file in `actsteer/evaluation/tasks/`), each registering itself there, and nothing else.
Checked on a copy of the package with those files added: `actsteer.fit` and `actsteer fit
--method` find and use the estimator, `actsteer eval` the task."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import actsteer

TOY_ESTIMATOR = '''"""Half-shift: half of Mean-AcT's shift (a toy estimator)."""

from actsteer.methods.mean_act import fit_mean
from actsteer.methods.registry import Method, register


def fit_half_shift(source, target):
    omega, beta = fit_mean(source, target)
    return omega, beta / 2


HALF_SHIFT = register(
    Method(
        name="half-shift",
        description="half of the mean difference (ω = 1)",
        fit_omega_beta=fit_half_shift,
    )
)
'''

TOY_TASK = '''"""Sentence loss: the mean next-token loss of one sentence (a toy task)."""

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from actsteer.evaluation.common import resolve_strengths, steering_applied
from actsteer.evaluation.tasks.registry import Task, register


@dataclass
class SentenceLoss:
    TASK: ClassVar[str] = "sentence-loss"
    METRICS: ClassVar[dict[str, str]] = {"loss": "mean next-token loss (nats)"}
    strength: float
    loss: float
    settings: dict[str, Any] = field(default_factory=dict)

    def metrics(self):
        return {"loss": self.loss}

    def intervals(self):
        return {}


def evaluate_grid(model, tokenizer, steering=None, strengths=None, sentence="A quiet day."):
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    results = []
    for lam in resolve_strengths(steering, strengths):
        with torch.no_grad(), steering_applied(model, steering, lam):
            loss = float(model(ids, labels=ids).loss)
        results.append(SentenceLoss(lam, loss, {"sentence": sentence}))
    return results


SENTENCE_LOSS = register(
    Task(
        name="sentence-loss",
        evaluate_grid=evaluate_grid,
        result_type=SentenceLoss,
        generation=False,
        description="mean next-token loss of one sentence",
    )
)
'''

CHECK_API = """
import sys, torch, actsteer
from actsteer.methods import METHODS
model, tok = actsteer.load_model(sys.argv[1])
source, target = open(sys.argv[2]).read().split("\\n"), open(sys.argv[3]).read().split("\\n")
half = actsteer.fit(model, tok, source=source, target=target, method="half-shift", progress=False)
mean = actsteer.fit(model, tok, source=source, target=target, method="mean-act", progress=False)
for name, amap in half.maps.items():
    assert torch.equal(amap.omega, torch.ones_like(amap.omega))
    torch.testing.assert_close(amap.beta, mean.maps[name].beta / 2)
print("half-shift" in METHODS, half.method, len(half.maps))
"""


@pytest.fixture(scope="module")
def package_with_toy(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A copy of the actsteer package with one added file, and a tiny Llama saved to disk."""
    root = tmp_path_factory.mktemp("newcomer")
    source = Path(actsteer.__file__).parent
    shutil.copytree(source, root / "actsteer", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "actsteer" / "methods" / "half_shift.py").write_text(TOY_ESTIMATOR)
    (root / "actsteer" / "evaluation" / "tasks" / "sentence_loss.py").write_text(TOY_TASK)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return root, model_dir


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )


def test_a_new_estimator_file_is_all_it_takes(package_with_toy, neutral, football):
    root, model_dir = package_with_toy
    (root / "source.txt").write_text("\n".join(neutral[:12]))
    (root / "target.txt").write_text("\n".join(football[:12]))
    api = run(root, "-c", CHECK_API, str(model_dir), "source.txt", "target.txt")
    assert api.returncode == 0, api.stderr
    assert api.stdout.split() == ["True", "half-shift", "2"]

    cli = "from actsteer.cli import app; app()"
    listed = run(root, "-c", cli, "methods")
    assert listed.returncode == 0 and "half-shift" in listed.stdout, listed.stderr
    fitted = run(
        root, "-c", cli, "fit", "--source", "source.txt", "--target", "target.txt",
        "--method", "half-shift", "--model", str(model_dir), "-o", "half.safetensors",
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    header = run(
        root, "-c", "import sys, actsteer; s = actsteer.Steering.load(sys.argv[1]); "
        "print(s.info.method, len(s.maps))", "half.safetensors",
    )  # fmt: skip
    assert header.stdout.split() == ["half-shift", "2"], header.stderr


def test_a_new_evaluation_task_file_is_all_it_takes(package_with_toy, neutral, football):
    root, model_dir = package_with_toy
    (root / "source.txt").write_text("\n".join(neutral[:12]))
    (root / "target.txt").write_text("\n".join(football[:12]))
    cli = "from actsteer.cli import app; app()"
    fitted = run(
        root, "-c", cli, "fit", "--source", "source.txt", "--target", "target.txt",
        "--model", str(model_dir), "-o", "toy.safetensors", "--support", "all",
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    evaluated = run(
        root, "-c", cli, "eval", "sentence-loss", "--model", str(model_dir), "--steering",
        "toy.safetensors", "--strength", "0,1", "--set", "sentence=The match ended.",
        "-o", "loss.json",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert "mean next-token loss" in evaluated.stdout
    check = run(
        root, "-c", "import json; r = json.load(open('loss.json'))['results']; "
        "print(len(r), r[0]['metrics']['loss'] != r[1]['metrics']['loss'], "
        "r[0]['result']['settings']['sentence'])",
    )  # fmt: skip
    assert check.stdout.split() == ["2", "True", "The", "match", "ended."], check.stderr
