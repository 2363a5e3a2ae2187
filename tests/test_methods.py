"""Every registered method against a direct computation of its formula on recorded activations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import actsteer
from actsteer.capture import record
from actsteer.methods import METHODS
from actsteer.methods.iti_c import probe_direction
from actsteer.modes import Independent

SOURCE = [f"the rude driver shouted at pedestrian number {i} for no reason" for i in range(14)]
TARGET = [f"a kind gardener waters flower bed {i} every morning with care" for i in range(11)]
MODULE = "model.layers.1.post_attention_layernorm"


def recorded(model, tok, pooling: str) -> tuple[np.ndarray, np.ndarray]:
    samples = [
        record(model, tok, t, [MODULE], pooling=pooling, progress=False)[MODULE]
        for t in (SOURCE, TARGET)
    ]
    return samples[0].double().numpy(), samples[1].double().numpy()


def fitted(model, tok, method: str, source=SOURCE, target=TARGET) -> tuple[np.ndarray, np.ndarray]:
    steering = actsteer.fit(
        model, tok, source, target, modules=[MODULE], method=method, progress=False
    )
    amap = steering.maps[MODULE]
    return amap.omega.double().numpy(), amap.beta.double().numpy()


def test_registry_lists_every_method():
    assert set(METHODS) == {
        "linear-act",
        "mean-act",
        "gaussian-act",
        "actadd",
        "iti-c",
        "aura",
        "lineas",
        "quantile-act",
        "joint-act",
    }


def test_linear_act_is_least_squares_on_sorted_pairs(tiny_llama, tokenizer):
    x, y = recorded(tiny_llama, tokenizer, "mean")
    omega, beta = fitted(tiny_llama, tokenizer, "linear-act")
    for unit in range(x.shape[1]):
        xs = np.sort(x[:, unit])
        ys = np.interp(np.linspace(0, 1, len(xs)), np.linspace(0, 1, len(y)), np.sort(y[:, unit]))
        slope, intercept = np.polyfit(xs, ys, 1)
        assert omega[unit] == pytest.approx(slope, rel=1e-3, abs=1e-4)
        assert beta[unit] == pytest.approx(intercept, rel=1e-3, abs=1e-4)


def test_mean_and_gaussian_act(tiny_llama, tokenizer):
    x, y = recorded(tiny_llama, tokenizer, "mean")
    omega, beta = fitted(tiny_llama, tokenizer, "mean-act")
    np.testing.assert_allclose(omega, 1.0)
    np.testing.assert_allclose(beta, y.mean(0) - x.mean(0), rtol=1e-4, atol=1e-6)
    omega, beta = fitted(tiny_llama, tokenizer, "gaussian-act")
    np.testing.assert_allclose(omega, y.std(0) / x.std(0), rtol=1e-4)
    np.testing.assert_allclose(beta, y.mean(0) - omega * x.mean(0), rtol=1e-4, atol=1e-5)


def test_actadd_is_the_last_token_difference_of_one_pair(tiny_llama, tokenizer):
    positive, negative = "I love this", "I hate this"
    outputs = {}
    module = dict(tiny_llama.named_modules())[MODULE]
    for text in (positive, negative):
        handle = module.register_forward_hook(lambda m, a, out, t=text: outputs.__setitem__(t, out))
        with torch.inference_mode():
            tiny_llama(**tokenizer(text, return_tensors="pt"))
        handle.remove()
    expected = (outputs[positive][0, -1] - outputs[negative][0, -1]).double().numpy()
    omega, beta = fitted(tiny_llama, tokenizer, "actadd", source=[negative], target=[positive])
    np.testing.assert_allclose(omega, 1.0)
    np.testing.assert_allclose(beta, expected, rtol=1e-4, atol=1e-5)


def test_iti_c_shifts_along_the_probe_normal_by_the_projected_spread(tiny_llama, tokenizer):
    x, y = recorded(tiny_llama, tokenizer, "mean")
    omega, beta = fitted(tiny_llama, tokenizer, "iti-c")
    np.testing.assert_allclose(omega, 1.0)
    features = np.concatenate([x, y])
    labels = np.r_[np.zeros(len(x)), np.ones(len(y))]
    probe = LogisticRegression(solver="newton-cg", max_iter=5000).fit(features, labels)
    normal = probe.coef_[0] / np.linalg.norm(probe.coef_[0])
    direction = beta / np.linalg.norm(beta)
    assert direction @ normal > 0.999, "β points along the probe normal, toward the target"
    assert np.linalg.norm(beta) == pytest.approx((features @ normal).std(ddof=1), rel=1e-2)


def test_iti_c_probe_converges_on_badly_scaled_units():
    """Units whose scales span four decades (in Gemma-3-270M's post-norms the 1st-99th
    percentile of unit ranges spans up to 3,900×): the probe reaches the optimum without a
    convergence warning (L-BFGS stopped short of it at its iteration cap)."""
    rng = np.random.default_rng(0)
    scale = 10.0 ** rng.uniform(-1, 3, 16)
    source = rng.normal(size=(200, 16)) * scale
    target = (rng.normal(size=(200, 16)) + 0.5) * scale
    features, labels = np.r_[source, target], np.r_[np.zeros(200), np.ones(200)]
    optimum = LogisticRegression(solver="newton-cg", tol=1e-12, max_iter=100_000)
    reference = optimum.fit(features, labels).coef_[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        normal = probe_direction(torch.from_numpy(source), torch.from_numpy(target)).numpy()
    assert normal @ reference / np.linalg.norm(reference) > 0.99999


def test_aura_dampens_by_auroc(tiny_llama, tokenizer):
    x, y = recorded(tiny_llama, tokenizer, "max")
    omega, beta = fitted(tiny_llama, tokenizer, "aura")
    labels = np.r_[np.ones(len(x)), np.zeros(len(y))]
    for unit in range(x.shape[1]):
        auroc = roc_auc_score(labels, np.r_[x[:, unit], y[:, unit]])
        expected = 1 - 2 * (auroc - 0.5) if auroc > 0.5 else 1.0
        assert omega[unit] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(beta, 0.0)
    assert (omega < 1).any(), "some units detect the source and are dampened"


@pytest.mark.parametrize(
    ("method", "strength", "ok"),
    [
        ("aura", 1.5, False),
        ("linear-act", -0.5, False),
        ("mean-act", 1.01, False),
        ("iti-c", 5.0, True),
        ("actadd", -3.0, True),
        ("gaussian-act", 0.3, True),
    ],
)
def test_strength_ranges(tiny_llama, tokenizer, method, strength, ok):
    steering = actsteer.fit(
        tiny_llama, tokenizer, SOURCE, TARGET, modules=[MODULE], method=method, progress=False
    )
    if ok:
        steering.attach(tiny_llama, strength).remove()
    else:
        with pytest.raises(actsteer.ActSteerError, match=f"outside .* of method '{method}'"):
            steering.attach(tiny_llama, strength)


def test_extrapolation_is_explicit_and_transient(tiny_llama, tokenizer, tmp_path):
    """λ > 1 for AcT only through `extrapolated`, which the saved artifact does not keep; the
    transport at λ = 1.5 is the line through λ = 0 and λ = 1 continued."""
    steering = actsteer.fit(tiny_llama, tokenizer, SOURCE, TARGET, modules=[MODULE], progress=False)
    beyond = steering.extrapolated(1.5)
    module = dict(tiny_llama.named_modules())[MODULE]
    x = torch.randn(2, 3, steering.maps[MODULE].omega.numel())
    with torch.inference_mode():
        plain = module(x)
        moved = {}
        for lam in (1.0, 1.5):
            with beyond.applied(tiny_llama, lam, support="all"):
                moved[lam] = module(x) - plain
    torch.testing.assert_close(moved[1.5], 1.5 * moved[1.0])
    with pytest.raises(actsteer.ActSteerError, match="extrapolated"):
        steering.attach(tiny_llama, 1.5)
    with pytest.raises(actsteer.ActSteerError, match="outside \\[0, 1.5\\]"):
        beyond.attach(tiny_llama, 1.6)
    with pytest.raises(actsteer.ActSteerError, match="finite"):
        steering.extrapolated(float("inf"))
    reloaded = actsteer.Steering.load(beyond.save(tmp_path / "s.safetensors"))
    with pytest.raises(actsteer.ActSteerError, match="outside"):
        reloaded.attach(tiny_llama, 1.5)


def test_support_pooling_all_takes_the_bounds_from_token_activations(
    tiny_llama, tokenizer, tmp_path
):
    """The map is the mean-pooled fit's; the support is the min–max of the source's tokens, so
    every source token is inside it (with mean pooling many are not); the choice round-trips."""
    options = dict(modules=[MODULE], progress=False)
    pooled = actsteer.fit(tiny_llama, tokenizer, SOURCE, TARGET, **options)
    tokens = actsteer.fit(
        tiny_llama, tokenizer, SOURCE, TARGET, mode=Independent(support_pooling="all"), **options
    )
    plain, wide = pooled.maps[MODULE], tokens.maps[MODULE]
    assert torch.equal(plain.omega, wide.omega) and torch.equal(plain.beta, wide.beta)
    activations = record(tiny_llama, tokenizer, SOURCE, [MODULE], pooling="all", progress=False)
    x = activations[MODULE]
    lo, hi = wide.bounds["q0-100"]
    assert torch.equal(lo, x.min(0).values) and torch.equal(hi, x.max(0).values)
    lo_mean, hi_mean = plain.bounds["q0-100"]
    inside_mean = ((x >= lo_mean) & (x <= hi_mean)).float().mean()
    assert inside_mean < 0.9 and bool((lo <= lo_mean).all() and (hi >= hi_mean).all())
    assert tokens.info.support_pooling == "all" and pooled.info.support_pooling is None
    loaded = actsteer.Steering.load(tokens.save(tmp_path / "s.safetensors"))
    assert loaded.info.support_pooling == "all"
    assert torch.equal(loaded.maps[MODULE].bounds["q0-100"][0], lo)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"mode": lambda: Independent(support_pooling="median")},
            "unknown support_pooling 'median'",
        ),
        (
            {"support_pooling": "all", "mode": "sequential"},
            "the old keywords \\(support_pooling=\\) both set them",
        ),
        (
            {"mode": Independent(support_pooling="all"), "method": "lineas"},
            "mode 'independent' does not apply to it",
        ),
    ],
)
def test_support_pooling_refusals(tiny_llama, tokenizer, options, message):
    with pytest.raises(actsteer.ActSteerError, match=message):
        if callable(options["mode"]):  # settings refused when they are made
            options = {**options, "mode": options["mode"]()}
        actsteer.fit(
            tiny_llama, tokenizer, SOURCE, TARGET, modules=[MODULE], progress=False, **options
        )
