"""Toxicity judges (the offline default and Hugging Face classifiers, here a tiny config-built
RoBERTa saved to disk) and the paired bootstrap the paper tables use."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RobertaConfig, RobertaForSequenceClassification

from actsteer.errors import ActSteerError
from actsteer.evaluation.judges import get_judge
from actsteer.evaluation.stats import paired_bootstrap_diff
from actsteer.evaluation.tasks import evaluate, toxicity

TEXTS = ["You are a stupid idiot.", "Have a lovely day.", "What a day it was, all in all."]


def classifier(path, tokenizer, labels: dict[int, str], problem_type: str | None = None):
    """A tiny random RoBERTa classifier with `labels`, saved (with a tokenizer) to `path`."""
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=600,
        num_labels=len(labels),
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
        pad_token_id=tokenizer.pad_token_id,
        problem_type=problem_type,
    )
    model = RobertaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def direct_logits(model, tokenizer, texts) -> torch.Tensor:
    """Each text's logits, one at a time (no padding)."""
    with torch.inference_mode():
        return torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])


def test_default_judge_is_the_offline_scorer():
    judge = get_judge()
    assert judge.name.startswith("alt-profanity-check")
    assert get_judge("profanity") is judge
    np.testing.assert_array_equal(judge.score(TEXTS), toxicity.score_toxicity(TEXTS))


@pytest.mark.parametrize("side", ["left", "right"])
def test_hf_judge_is_the_toxic_label_probability(tmp_path, tokenizer, side):
    """Whatever padding side the tokenizer was saved with (RoBERTa reads the first token)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    model = classifier(tmp_path, tokenizer, {0: "neutral", 1: "toxic"})
    judge = get_judge(f"hf:{tmp_path}")
    assert judge.name == f"hf:{tmp_path}"
    expected = direct_logits(model, tokenizer, TEXTS).softmax(-1)[:, 1].numpy()
    np.testing.assert_allclose(judge.score(TEXTS), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(toxicity.score_toxicity(TEXTS, f"hf:{tmp_path}"), expected, 1e-5)


def test_multi_label_judge_uses_the_sigmoid(tmp_path, tokenizer):
    labels = {0: "obscene", 1: "TOXIC", 2: "insult"}
    model = classifier(tmp_path, tokenizer, labels, "multi_label_classification")
    expected = direct_logits(model, tokenizer, TEXTS).sigmoid()[:, 1].numpy()
    np.testing.assert_allclose(get_judge(f"hf:{tmp_path}").score(TEXTS), expected, 1e-5, 1e-6)


def test_judge_errors(tmp_path, tokenizer):
    classifier(tmp_path, tokenizer, {0: "positive", 1: "negative"})
    with pytest.raises(ActSteerError, match="no label called 'toxic'.*negative, positive"):
        get_judge(f"hf:{tmp_path}")
    with pytest.raises(ActSteerError, match="unknown toxicity judge 'roberta'"):
        get_judge("roberta")
    with pytest.raises(ActSteerError, match="cannot load the toxicity judge"):
        get_judge(f"hf:{tmp_path / 'missing'}")


def test_toxicity_task_records_its_judge(tmp_path, tiny_llama, tokenizer):
    classifier(tmp_path, tokenizer, {0: "neutral", 1: "toxic"})
    options = dict(
        n_challenging=2, n_nontoxic=1, sampling={"do_sample": False, "max_new_tokens": 4},
        progress=False,
    )  # fmt: skip
    result = evaluate("toxicity", tiny_llama, tokenizer, judge=f"hf:{tmp_path}", **options)
    assert result.settings["scorer"] == f"hf:{tmp_path}"
    continuations = [s["continuation"] for s in result.samples]
    expected = get_judge(f"hf:{tmp_path}").score(continuations)
    np.testing.assert_allclose([s["score"] for s in result.samples], expected)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.floats(-1, 1))
def test_paired_bootstrap_of_a_constant_shift_is_exact(values, shift):
    treated = np.asarray(values) + shift
    mean, (lo, hi) = paired_bootstrap_diff(treated, values, n_boot=200)
    assert mean == pytest.approx(shift, abs=1e-9)
    assert lo == pytest.approx(shift, abs=1e-9) and hi == pytest.approx(shift, abs=1e-9)


def test_paired_bootstrap_is_narrower_than_the_arms_spread():
    """Two arms with a large shared per-prompt spread and a small consistent difference: the
    paired interval excludes zero although each arm's own interval is wide."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, 500)
    treated = base - 2 + rng.normal(0, 1, 500)
    mean, (lo, hi) = paired_bootstrap_diff(treated, base)
    assert lo < mean < hi < 0
    assert mean == pytest.approx(-2, abs=0.2)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap_diff([1.0, 2.0], [1.0])
