"""LinEAS (method "lineas"): maps of all modules trained jointly through the model, on tiny
config-built models. The loss falls, the end-to-end distance on held-out texts beats
independent Linear-AcT's, the penalty leaves units exactly untouched, λ = 0 is the plain model,
a seed reproduces, a diverging run is a clear error that leaves the model as it was, and the
result is an ordinary steering (artifact, CLI)."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.capture import record, resolve_modules
from actsteer.choices import DEFAULT_MODULES
from actsteer.errors import ActSteerError
from actsteer.lineas import end_to_end_distance, proximal_step, w2_per_unit
from actsteer.methods import get_method
from actsteer.modes import DEFAULT_SPARSITY, EndToEnd

PROBE = ["The cat sat on the mat and looked out of the window.", "Rain fell all night."]


TRAINING = ("training_steps", "learning_rate", "sparsity", "seed", "init", "held_out")


def lineas(model, tok, source, target, **kwargs):
    """LinEAS at 40 steps and learning rate 0.05 unless told; training settings given as
    keywords go into its EndToEnd mode, the rest to fit."""
    settings = {"training_steps": 40, "learning_rate": 0.05}
    settings |= {key: kwargs.pop(key) for key in TRAINING if key in kwargs}
    return actsteer.fit(
        model, tok, source=source, target=target, method="lineas", mode=EndToEnd(**settings),
        **{"progress": False, **kwargs},
    )  # fmt: skip


def held_out_distance(model, tok, steering, source, target) -> float:
    """The LinEAS loss on texts not fitted on: source recorded through the library's own hooks
    (support all, λ = 1), target on the plain model."""
    names = steering.modules
    plain = record(model, tok, target, names, progress=False)
    with steering.applied(model, 1.0, "all"):
        steered = record(model, tok, source, names, progress=False)
    return end_to_end_distance(steered, plain)


def logits(model, tok, texts=PROBE) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def no_hooks(model) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )


@pytest.fixture(scope="module")
def trained(tiny_llama, tokenizer, neutral, football):
    """One LinEAS fit on 32 + 40 texts, all 32 source texts in every step (and the model's
    state before)."""
    before = model_state(tiny_llama)
    steering = lineas(tiny_llama, tokenizer, neutral[:32], football[:40], training_steps=60)
    return steering, before


# ---------------------------------------------------------------------------------------------
# the loss, the training, the result


def test_w2_per_unit_is_the_sorted_gap_and_handles_unequal_counts():
    x = torch.tensor([[3.0], [1.0], [2.0]])
    assert float(w2_per_unit(x, torch.tensor([[2.0], [3.0], [4.0]]))) == pytest.approx(1.0)
    # 2 vs 3 samples: both on a 3-level grid, the source interpolated (1, 2, 3)
    two = torch.tensor([[3.0], [1.0]])
    assert float(w2_per_unit(two, torch.tensor([[1.0], [2.0], [3.0]]))) == pytest.approx(0.0)


def test_the_loss_decreases(trained):
    steering, _ = trained
    curve = steering.info.data["training"]["loss_curve"]
    first, last = curve[0][1], curve[-1][1]
    assert curve[-1][0] == 60
    assert last < 0.6 * first, curve  # the rest: the finite-sample W2 of 32 vs 40 texts
    assert all(b[1] <= a[1] * 1.01 for a, b in zip(curve[1:], curve[2:], strict=False)), curve


def test_result_is_an_ordinary_steering(trained, tiny_llama, tmp_path):
    steering, _ = trained
    assert steering.method == "lineas"
    assert steering.info.mode == "end-to-end"
    assert steering.default_support == "all"
    assert steering.info.pooling == "mean"
    assert steering.modules == resolve_modules(tiny_llama, DEFAULT_MODULES)
    training = steering.info.data["training"]
    assert training["training_steps"] == 60 and training["learning_rate"] == 0.05
    assert training["sparsity"] == DEFAULT_SPARSITY and training["init"] == "identity"
    for amap in steering.maps.values():
        assert set(amap.bounds) == {"q0-100", "q1-99", "q5-95"}
        assert amap.omega.requires_grad is False
    loaded = actsteer.Steering.load(steering.save(tmp_path / "l.safetensors"))
    assert loaded.method == "lineas" and loaded.info.mode == "end-to-end"
    assert loaded.info.data["training"] == training
    for name, amap in steering.maps.items():
        assert torch.equal(loaded.maps[name].omega, amap.omega)
        assert torch.equal(loaded.maps[name].beta, amap.beta)


def test_training_applies_the_maps_as_the_hooks_do(
    trained, tiny_llama, tokenizer, neutral, football
):
    """The curve's last point (the loss after the last step, all 32 source texts in one pass)
    is the distance measured through the library's hooks on the same texts."""
    steering, _ = trained
    final = steering.info.data["training"]["loss_curve"][-1][1]
    measured = held_out_distance(tiny_llama, tokenizer, steering, neutral[:32], football[:40])
    assert measured == pytest.approx(final, rel=1e-4)


def test_beats_independent_linear_act_on_held_out_texts(tiny_llama, tokenizer, neutral, football):
    """On every norm output (seven modules, where each map feeds the next), the end-to-end
    distance on texts not fitted on is lower than independent Linear-AcT's."""
    source, target = neutral[:32], football[:32]
    fit = dict(source=source, target=target, modules="layernorms", progress=False)
    act = actsteer.fit(tiny_llama, tokenizer, **fit)
    ours = actsteer.fit(
        tiny_llama, tokenizer, method="lineas", mode=EndToEnd(training_steps=40), **fit
    )
    held = neutral[64:], football[64:]
    mine = held_out_distance(tiny_llama, tokenizer, ours, *held)
    theirs = held_out_distance(tiny_llama, tokenizer, act, *held)
    assert mine < 0.9 * theirs, (mine, theirs)


def test_held_out_texts_choose_the_step_whose_maps_are_returned(
    tiny_llama, tokenizer, neutral, football
):
    """held_out=0.25: a quarter of each set never trains; its distance is checked along the
    way and the maps returned are those of the best check (their held-out distance, measured
    again through the library's hooks, is that check's), here before the last step."""
    from actsteer.lineas import split_off

    source, target = neutral[:32], football[:32]
    steering = lineas(
        tiny_llama, tokenizer, source, target, training_steps=60, learning_rate=0.3,
        held_out=0.25, modules="layernorms",
    )  # fmt: skip
    training = steering.info.data["training"]
    assert training["held_out_texts"] == [8, 8]
    steps = [step for step, _ in training["held_out_curve"]]
    assert steps == [*range(3, 60, 3), 60]
    best_step, best = min(training["held_out_curve"], key=lambda point: point[1])
    assert training["chosen_step"] == best_step
    held_source, held_target = (split_off(t, 0.25, 0, "")[1] for t in (source, target))
    again = held_out_distance(tiny_llama, tokenizer, steering, held_source, held_target)
    assert again == pytest.approx(best, rel=1e-4)
    assert best_step < 60, "at this learning rate the last step should not be the best"


def test_model_is_left_exactly_as_it_was(trained, tiny_llama):
    _, before = trained
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in tiny_llama.parameters())
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert no_hooks(tiny_llama)
    assert not tiny_llama.training


def test_strength_zero_is_bit_identical_to_the_plain_model(trained, tiny_llama, tokenizer):
    steering, _ = trained
    plain = logits(tiny_llama, tokenizer)
    with steering.applied(tiny_llama, 0.0):
        assert torch.equal(logits(tiny_llama, tokenizer), plain)
    with steering.applied(tiny_llama, 1.0):
        assert not torch.equal(logits(tiny_llama, tokenizer), plain)
    get_method("lineas").check_strength(1.0)
    with pytest.raises(ActSteerError, match="outside"):
        steering.check_strength(1.5)


# ---------------------------------------------------------------------------------------------
# sparsity, seed


def test_sparsity_leaves_units_exactly_untouched(tiny_llama, tokenizer, neutral, football):
    source, target = neutral[:24], football[:24]
    dense = lineas(tiny_llama, tokenizer, source, target, training_steps=20, sparsity=0.0)
    sparse = lineas(tiny_llama, tokenizer, source, target, training_steps=20, sparsity=3.0)

    def untouched(steering) -> int:
        return sum(int(((m.omega == 1) & (m.beta == 0)).sum()) for m in steering.maps.values())

    units = sum(m.dim for m in dense.maps.values())
    assert untouched(dense) == 0
    assert 0 < untouched(sparse) < units
    assert sparse.info.data["training"]["units_touched"] == units - untouched(sparse)


def test_proximal_step_is_group_soft_thresholding():
    omega = torch.tensor([1.3, 1.0, 1.01])
    beta = torch.tensor([0.4, -0.02, 0.0])
    proximal_step(omega, beta, unit_threshold=0.1, module_threshold=0.0)
    # unit 0: |(0.3, 0.4)| = 0.5 → shrunk by 0.1 to 0.4; units 1, 2 below 0.1 → exactly 0
    torch.testing.assert_close(omega, torch.tensor([1.24, 1.0, 1.0]))
    torch.testing.assert_close(beta, torch.tensor([0.32, 0.0, 0.0]))
    assert not torch.signbit(beta).any()  # no -0.0
    proximal_step(omega, beta, unit_threshold=0.0, module_threshold=1.0)  # module norm 0.4
    assert torch.equal(omega, torch.ones(3)) and torch.equal(beta, torch.zeros(3))


def test_a_seed_reproduces_the_maps(tiny_llama, tokenizer, neutral, football):
    source, target = neutral[:48], football[:30]
    settings = dict(training_steps=6)  # random 32-text subsets of the 48 each step
    one = lineas(tiny_llama, tokenizer, source, target, seed=3, **settings)
    two = lineas(tiny_llama, tokenizer, source, target, seed=3, **settings)
    other = lineas(tiny_llama, tokenizer, source, target, seed=4, **settings)
    for name, amap in one.maps.items():
        assert torch.equal(amap.omega, two.maps[name].omega)
        assert torch.equal(amap.beta, two.maps[name].beta)
    assert any(not torch.equal(a.beta, other.maps[n].beta) for n, a in one.maps.items())


def test_training_says_how_long_it_will_take(tiny_llama, tokenizer, neutral, football, capsys):
    """After its first step LinEAS prints the time per step and the whole run's estimate (the
    bar then counts down); with progress off it says nothing."""
    lineas(tiny_llama, tokenizer, neutral[:16], football[:16], training_steps=3, progress=True)
    said = capsys.readouterr().err
    assert re.search(r"LinEAS takes [\d.]+ s per step here: about \d+ s for 3 steps", said), said
    lineas(tiny_llama, tokenizer, neutral[:16], football[:16], training_steps=3, progress=False)
    assert "LinEAS takes" not in capsys.readouterr().err


def test_init_from_linear_act_starts_at_its_maps(tiny_llama, tokenizer, neutral, football):
    source, target = neutral[:20], football[:20]
    act = actsteer.fit(tiny_llama, tokenizer, source=source, target=target, progress=False)
    one = dict(training_steps=1)  # every step on all 20 source texts
    start = lineas(tiny_llama, tokenizer, source, target, init="linear-act", **one)
    identity = lineas(tiny_llama, tokenizer, source, target, **one)
    curve, plain_curve = (s.info.data["training"]["loss_curve"] for s in (start, identity))
    assert curve[0][1] < plain_curve[0][1]  # Linear-AcT's maps already move toward the target
    assert held_out_distance(tiny_llama, tokenizer, act, source, target) == pytest.approx(
        curve[0][1], rel=1e-4
    )


def test_all_pooling_and_a_bounded_support_train(tiny_llama, tokenizer, neutral, football):
    steering = lineas(
        tiny_llama, tokenizer, neutral[:12], football[:12], training_steps=10, pooling="all",
        support="q0-100",
    )  # fmt: skip
    curve = steering.info.data["training"]["loss_curve"]
    assert steering.info.pooling == "all" and steering.default_support == "q0-100"
    assert curve[-1][1] < curve[0][1]


# ---------------------------------------------------------------------------------------------
# errors


def test_a_diverging_run_is_a_clear_error_and_leaves_the_model_untouched(
    tiny_llama, tokenizer, neutral, football
):
    plain = logits(tiny_llama, tokenizer)
    embed = tiny_llama.get_input_embeddings().weight
    embed.requires_grad_(False)  # a mixed state, restored as it was
    try:
        with pytest.raises(ActSteerError, match=r"at step \d+ .*lower the learning rate"):
            lineas(
                tiny_llama,
                tokenizer,
                neutral[:8],
                football[:8],
                training_steps=10,
                learning_rate=1e30,
            )
        assert not embed.requires_grad
        assert all(p.requires_grad for p in tiny_llama.parameters() if p is not embed)
    finally:
        embed.requires_grad_(True)
    assert no_hooks(tiny_llama)
    assert torch.equal(logits(tiny_llama, tokenizer), plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="linear-act", mode=EndToEnd(training_steps=10)),
            "training_steps= only apply to methods trained end to end",
        ),
        (
            dict(method="mean-act", mode=EndToEnd(sparsity=0.1, learning_rate=0.1)),
            "learning_rate=, sparsity=",
        ),
        (dict(method="lineas", mode="sequential"), "mode 'sequential' does not apply"),
        (dict(method="lineas", mode=lambda: EndToEnd(training_steps=0)), "steps must be ≥ 1"),
        (dict(method="lineas", mode=lambda: EndToEnd(learning_rate=-1.0)), "learning_rate must be"),
        (dict(method="lineas", mode=lambda: EndToEnd(sparsity=float("nan"))), "sparsity must be"),
        (dict(method="lineas", mode=lambda: EndToEnd(init="random")), "unknown init 'random'"),
        (dict(method="lineas", mode=lambda: EndToEnd(held_out=1.0)), "0 ≤ held_out < 1"),
        (dict(method="lineas", mode=EndToEnd(held_out=0.75)), "of 4 source texts leaves 1 to"),
    ],
)
def test_settings_errors(tiny_llama, tokenizer, neutral, football, kwargs, message):
    with pytest.raises(ActSteerError, match=message):
        if callable(kwargs["mode"]):  # settings refused when they are made
            kwargs = {**kwargs, "mode": kwargs["mode"]()}
        actsteer.fit(
            tiny_llama, tokenizer, source=neutral[:4], target=football[:4], progress=False,
            **kwargs,
        )  # fmt: skip


def test_the_old_keywords_still_work_with_a_warning(tiny_llama, tokenizer, neutral, football):
    """fit(steps=…, learning_rate=…) as before modes: the same fit, and a DeprecationWarning
    naming the new spelling."""
    texts = dict(source=neutral[:32], target=football[:32])
    with pytest.warns(DeprecationWarning, match=r"now fit\(mode=EndToEnd\(training_steps=…"):
        old = actsteer.fit(tiny_llama, tokenizer, method="lineas", steps=3, progress=False, **texts)
    new = lineas(tiny_llama, tokenizer, training_steps=3, learning_rate=0.02, **texts)
    assert old.info.data["training"] == new.info.data["training"]
    refused = pytest.raises(ActSteerError, match="steps= only apply to methods trained end to")
    with refused, pytest.warns(DeprecationWarning):
        actsteer.fit(tiny_llama, tokenizer, method="linear-act", steps=10, **texts)


def test_the_method_has_no_per_module_estimate():
    with pytest.raises(ActSteerError, match="trains all modules' maps jointly"):
        get_method("lineas").fit(torch.randn(4, 3), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_fit_with_method_lineas(
    tiny_llama, tokenizer, neutral, football, tmp_path, monkeypatch
):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    source, target, out = tmp_path / "s.txt", tmp_path / "t.txt", tmp_path / "l.safetensors"
    source.write_text("\n".join(neutral[:16]) + "\n")
    target.write_text("\n".join(football[:16]) + "\n")
    result = CliRunner().invoke(
        cli.app,
        ["fit", "--source", str(source), "--target", str(target), "-o", str(out)]
        + ["--method", "lineas", "--training-steps", "5", "--learning-rate", "0.02"]
        + ["--sparsity", "0.1"],
    )
    assert result.exit_code == 0, result.output
    steering = actsteer.Steering.load(out)
    assert steering.method == "lineas" and steering.info.mode == "end-to-end"
    training = steering.info.data["training"]
    assert (training["training_steps"], training["learning_rate"], training["sparsity"]) == (
        5, 0.02, 0.1,
    )  # fmt: skip
    other = tmp_path / "other.safetensors"  # a new path: an existing one is refused first
    refused = CliRunner().invoke(
        cli.app,
        ["fit", "--source", str(source), "--target", str(target), "-o", str(other)]
        + ["--training-steps", "5"],
    )
    assert refused.exit_code != 0
    assert "only apply to methods trained end to end" in refused.output
    old = CliRunner().invoke(
        cli.app,
        ["fit", "--source", str(source), "--target", str(target), "-o", str(other)]
        + ["--method", "lineas", "--steps", "2"],
    )
    assert old.exit_code == 0, old.output
    assert "--steps is now --training-steps" in old.output
    assert actsteer.Steering.load(other).info.data["training"]["training_steps"] == 2
