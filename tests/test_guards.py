"""Run-time guards: non-finite outputs are a clear error naming the module and λ, a λ far beyond
the fit data warns, the same steering applied twice is refused; none of them runs per module."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.errors import ActSteerError
from actsteer.guards import check_far_strength, reach
from actsteer.maps import AffineMap


# Norm outputs: they feed the MLP directly, so a huge λ turns the hooked output itself
# non-finite (at attn-out, the default, the next norm would absorb it into finite garbage).
@pytest.fixture(scope="module")
def actadd(tiny_llama, tokenizer, neutral, football):
    return actsteer.fit(
        tiny_llama,
        tokenizer,
        neutral[:8],
        football[:8],
        method="actadd",
        modules="post-attn-ln",
        progress=False,
    )


@pytest.fixture(scope="module")
def linear(tiny_llama, tokenizer, neutral, football):
    return actsteer.fit(
        tiny_llama, tokenizer, neutral[:8], football[:8], modules="post-attn-ln", progress=False
    )


def prompt(tokenizer):
    return tokenizer(["The weather today is"], return_tensors="pt")


@pytest.mark.parametrize("sample", [False, True])
def test_a_huge_strength_is_a_clear_error_naming_module_and_strength(
    actadd, tiny_llama, tokenizer, sample
):
    inputs = prompt(tokenizer)
    huge = actadd.extrapolated(1e38)  # on purpose: without it the λ itself is refused
    with pytest.raises(ActSteerError) as caught, huge.applied(tiny_llama, 1e38):
        tiny_llama.generate(**inputs, max_new_tokens=3, do_sample=sample)
    message = str(caught.value)
    assert "non-finite" in message and "λ = 1e+38" in message and "lower the strength" in message
    assert "'model.layers." in message  # the module, by name
    assert not tiny_llama._forward_hooks, "the output check went with the hooks"
    with torch.no_grad():
        assert torch.isfinite(tiny_llama(**inputs).logits).all()


def test_per_row_strengths_are_named_too(actadd, tiny_llama, tokenizer):
    inputs = tokenizer(["a b c", "a b c"], return_tensors="pt")
    lam = torch.tensor([1.0, 1e38])
    with (
        pytest.raises(ActSteerError, match=r"λ = \[1, 1e\+38\]"),
        actadd.extrapolated(1e38).applied(tiny_llama, lam),
        torch.no_grad(),
    ):
        tiny_llama(**inputs)


def test_a_strength_far_beyond_the_fit_data_warns(actadd, linear, tiny_llama, tokenizer):
    inputs = prompt(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for steering, lam in ((actadd, 1.0), (linear, 1.0)):
            with steering.applied(tiny_llama, lam), torch.no_grad():
                tiny_llama(**inputs)
    far = r"λ = 100 shifts activations of 'model\.layers\."
    with pytest.warns(UserWarning, match=far), actadd.applied(tiny_llama, 100.0), torch.no_grad():
        tiny_llama(**inputs)


@pytest.mark.parametrize("method", ["actadd", "iti-c"])
def test_a_strength_that_collapses_the_output_is_refused(
    method, tiny_llama, tokenizer, neutral, football
):
    """ActAdd and ITI-c take any λ; at 1e38 the norms squash the activations to a constant and
    the text comes out empty, with every value finite. Such a λ is refused unless the steering
    was extrapolated to it on purpose."""
    steering = actsteer.fit(tiny_llama, tokenizer, neutral[:16], football[:16], method=method)
    for lam in (1e38, torch.tensor([1.0, 1e38])):
        with pytest.raises(ActSteerError, match=r"the output collapses .*choose \|λ\| ≤ .*extra"):
            steering.attach(tiny_llama, lam)
    assert not tiny_llama._forward_hooks, "a refused strength leaves nothing registered"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steering.extrapolated(1e38).attach(tiny_llama, 1e38).remove()


def test_the_output_check_is_one_hook_on_the_model_only_while_steered(actadd, linear, tiny_llama):
    assert not tiny_llama._forward_hooks
    with actsteer.steered(tiny_llama, (actadd, 1.0), (linear, 0.5)):
        assert len(tiny_llama._forward_hooks) == 1, "one check, whatever the steerings"
    with actadd.applied(tiny_llama, 0.0):
        assert not tiny_llama._forward_hooks, "λ = 0 is the untouched model: no hook at all"
    assert not tiny_llama._forward_hooks


def test_a_steered_model_is_freed_when_its_user_lets_it_go(actadd, tiny_llama):
    """The guards' registry holds models weakly: a copy that was steered (its hooks attached,
    removed, attached again) is collected once nothing else holds it."""
    import gc
    import weakref

    model = copy.deepcopy(tiny_llama)
    with actadd.applied(model, 1.0):
        model(torch.tensor([[1, 2, 3]]))
    actadd.attach(model, 0.5).remove()
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_the_same_steering_twice_on_one_model_is_refused(actadd, linear, tiny_llama):
    other = copy.deepcopy(tiny_llama)
    with actadd.applied(tiny_llama, 1.0) as handle:
        with (
            pytest.raises(ActSteerError, match="already applied to this model"),
            actadd.applied(tiny_llama, 0.5),
        ):
            pass
        with pytest.raises(ActSteerError, match="set_strength"):
            actadd.attach(tiny_llama, 0.5)
        with pytest.raises(ActSteerError, match="already applied"):
            actadd.extrapolated(3.0).attach(tiny_llama, 0.5)  # the same maps
        handle.set_strength(2.0)  # the way to change it
        with actadd.applied(other, 1.0):  # another model is fine
            pass
    with pytest.raises(ActSteerError, match="outside"):
        linear.attach(tiny_llama, 3.0)  # a refused strength leaves nothing registered
    with linear.applied(tiny_llama, 0.5), actadd.applied(tiny_llama, 1.0):
        pass


def test_cli_generate_at_a_huge_strength_says_so_in_one_line(
    actadd, tiny_llama, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    path = actadd.save(tmp_path / "a.safetensors")
    args = ["generate", "--steering", str(path), "-s", "1e38", "--sample", "--max-new-tokens", "3"]
    refused = CliRunner().invoke(cli.app, [*args, "--", "Hello"])
    assert refused.exit_code == 1
    last = refused.output.strip().splitlines()[-1]
    assert last.startswith("error: λ = [1e+38] shifts") and "--extrapolate 1e+38" in last
    result = CliRunner().invoke(cli.app, [*args, "--extrapolate", "1e38", "--", "Hello"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: steering made activations non-finite") and "1e+38" in last


def test_a_unit_the_fit_data_never_moves_is_no_false_alarm():
    """A dead channel (range 0 on the fit data, as Gemma's post-norms have) shifted by a small
    β is measured against its module's typical range, not read as an infinite shift; a shift
    many module ranges wide still counts."""
    lo, hi = torch.tensor([-1.0, 0.0, -2.0, -1.5, 0.0]), torch.tensor([1.0, 0.0, 2.0, 1.5, 3.0])
    bounds = {"q0-100": (lo, hi)}  # ranges 2, 0, 4, 3, 3: the median is 3
    small = AffineMap(torch.ones(5), torch.tensor([0.0, 0.06, 0.0, 0.0, 0.0]), bounds)
    worst, where = reach({"m": small})
    assert worst == pytest.approx(0.06 / (0.1 * 3)) and where == "m"
    large = AffineMap(torch.ones(5), torch.tensor([0.0, 60.0, 0.0, 0.0, 0.0]), bounds)
    assert reach({"small": small, "large": large}) == (pytest.approx(60 / 0.3), "large")
    with pytest.warns(UserWarning, match="by up to 200×"):
        check_far_strength(reach({"large": large}), torch.tensor(1.0), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_far_strength(reach({"small": small}), torch.tensor(1.0), None)
