"""Toxicity judges: the offline default (alt-profanity-check) or a Hugging Face classifier.

A judge is named by a string:
- "profanity" (default): `alt-profanity-check`, a linear SVM over bag-of-words calibrated to a
  probability; offline, fast, sees offensive wording rather than subtler toxicity;
- "hf:ID_OR_PATH": a sequence-classification model loaded with transformers, e.g. the AcT
  paper's judge `hf:s-nlp/roberta_toxicity_classifier`. Its score is the probability of the
  label called "toxic" (or "toxicity"): softmax over the labels, or the label's sigmoid for
  multi-label models (problem_type "multi_label_classification", e.g. unitary/toxic-bert).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from actsteer.errors import ActSteerError
from actsteer.extras import require

DEFAULT_JUDGE = "profanity"
TOXIC_LABELS = ("toxic", "toxicity")
HF_PREFIX = "hf:"
BATCH = 32
MAX_TOKENS = 512


@dataclass(frozen=True)
class Judge:
    """A named scorer: texts → toxicity probabilities in [0, 1]."""

    name: str
    score: Callable[[Sequence[str]], np.ndarray]


def _profanity() -> Judge:
    predict_prob = require("profanity_check", "eval", "toxicity scoring").predict_prob
    try:
        name = f"alt-profanity-check=={importlib.metadata.version('alt-profanity-check')}"
    except importlib.metadata.PackageNotFoundError:
        name = "alt-profanity-check"

    def score(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        return np.asarray(predict_prob(texts), dtype=np.float64) if texts else np.zeros(0)

    return Judge(name, score)


def _classifier(source: str) -> Judge:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    except OSError as error:
        raise ActSteerError(
            f"cannot load the toxicity judge {source!r} ({error}); give a hub id this machine "
            "can reach or a local folder with a sequence-classification model"
        ) from error
    # Encoder classifiers (BERT, RoBERTa) read the first token: pad on the right, which
    # decoder classifiers (their last real token) handle too.
    tokenizer.padding_side = "right"
    labels = {str(name).lower(): int(i) for i, name in model.config.id2label.items()}
    toxic = next((labels[name] for name in TOXIC_LABELS if name in labels), None)
    if toxic is None:
        raise ActSteerError(
            f"judge {source!r} has no label called 'toxic' (its labels: "
            f"{', '.join(sorted(labels))}); use a toxicity classifier"
        )
    multi_label = model.config.problem_type == "multi_label_classification"

    def score(texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), BATCH):
            batch = tokenizer(
                list(texts[start : start + BATCH]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
            )
            with torch.inference_mode():
                logits = model(**batch).logits.float()
            chance = logits.sigmoid() if multi_label else logits.softmax(-1)
            out.append(chance[:, toxic].numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    return Judge(f"{HF_PREFIX}{source}", score)


def get_judge(spec: str | None = None) -> Judge:
    """The judge named by `spec` (None: the default), loaded once per process."""
    return _load(spec or DEFAULT_JUDGE)


@cache
def _load(spec: str) -> Judge:
    if spec == DEFAULT_JUDGE:
        return _profanity()
    if spec.startswith(HF_PREFIX) and spec[len(HF_PREFIX) :].strip():
        return _classifier(spec[len(HF_PREFIX) :])
    raise ActSteerError(
        f"unknown toxicity judge {spec!r}; use {DEFAULT_JUDGE!r} (offline) or hf:ID_OR_PATH "
        "(a sequence-classification model, e.g. hf:s-nlp/roberta_toxicity_classifier)"
    )
