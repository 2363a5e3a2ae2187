"""Calibration: the search on costs with a known answer, the two costs on a tiny model (checked
against the perplexity task and a direct KL), the stored default strength, the CLI, and that
it reads only the data it is given."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import ActSteerError, cli
from actsteer.calibration import (
    RELATIVE_TOLERANCE,
    calibrate,
    calibrate_modules,
    likelihood_gap,
    package_prompts,
    search_strength,
    text_losses,
)
from actsteer.evaluation.likelihood import encode, special_prefix
from actsteer.evaluation.tasks import evaluate
from actsteer.fitting import fit
from actsteer.maps import AffineMap
from actsteer.steering import Steering, SteeringInfo

#: Tiny perplexity settings: 4 windows of 32 tokens from the start of the given text.
TINY = {"passages": 4, "passage_tokens": 32, "offset": 0}


class Recorder:
    """A cost function of λ that records the order of its calls."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, strength: float) -> float:
        self.calls.append(strength)
        return self.function(strength)


# ---------------------------------------------------------------------------------------------
# the search, on costs whose answer is known


def test_bounded_search_finds_the_largest_lambda_within_budget():
    cost = Recorder(lambda lam: lam**2)  # within 0.25 exactly up to λ = 0.5
    chosen, rejected, why, points = search_strength(cost, 0.25, 1.0)
    tolerance = RELATIVE_TOLERANCE
    assert why == "tolerance" and cost.calls[0] == 1.0
    assert chosen**2 <= 0.25 < rejected**2
    assert rejected - chosen <= tolerance and chosen <= 0.5 < chosen + tolerance
    assert set(points) == {0.0, *cost.calls} and all(points[s] == s**2 for s in cost.calls)
    assert len(cost.calls) == 1 + round(math.log2(1 / tolerance))  # the top, then halvings


def test_a_budget_above_the_cost_at_the_top_gives_the_top_in_one_evaluation():
    cost = Recorder(lambda lam: lam)
    assert search_strength(cost, 5.0, 1.0)[:3] == (1.0, None, "range")
    assert cost.calls == [1.0]


def test_a_budget_of_zero_gives_zero_for_a_growing_cost():
    chosen, rejected, why, points = search_strength(lambda lam: lam, 0.0, 1.0, tolerance=0.01)
    assert chosen == 0.0 and 0 < rejected <= 0.01 and why == "tolerance"
    assert points[0.0] == 0.0


def test_unbounded_search_brackets_by_doubling_then_bisects():
    cost = Recorder(lambda lam: lam / 10)  # within 3 up to λ = 30
    chosen, rejected, why, _ = search_strength(cost, 3.0, None, start=1.0, cap=256)
    assert cost.calls[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert all(16.0 < s < 32.0 for s in cost.calls[6:])
    assert why == "tolerance" and chosen <= 30 < rejected
    assert rejected - chosen <= 32 * RELATIVE_TOLERANCE


def test_unbounded_search_stops_at_the_cap_and_a_nan_cost_is_over_budget():
    cost = Recorder(lambda lam: 0.0)
    assert search_strength(cost, 1.0, None, start=0.5, cap=3.0)[:3] == (3.0, None, "cap")
    assert cost.calls == [0.5, 1.0, 2.0, 3.0]
    chosen, rejected, *_ = search_strength(lambda lam: math.nan, 1.0, 1.0, tolerance=0.1)
    assert chosen == 0.0 and rejected <= 0.1


def test_search_arguments_are_checked():
    for kwargs in ({"tolerance": 0.0}, {"tolerance": math.inf}):
        with pytest.raises(ActSteerError, match="tolerance"):
            search_strength(lambda lam: lam, 1.0, 1.0, **kwargs)
    with pytest.raises(ActSteerError, match="start"):
        search_strength(lambda lam: lam, 1.0, None, start=4.0, cap=2.0)


# ---------------------------------------------------------------------------------------------
# the costs on a tiny model


@pytest.fixture(scope="module")
def steering(tiny_llama, tokenizer, neutral, football) -> Steering:
    """Linear-AcT neutral → football on the tiny Llama, support all (so λ moves everything)."""
    return fit(
        tiny_llama, tokenizer, source=neutral[:16], target=football[:16],
        modules="post-attn-ln", support="all", progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, neutral, football):
    """A raw text for the perplexity cost (not WikiText: calibration reads what it is given)."""
    path = tmp_path_factory.mktemp("text") / "held_out.raw"
    path.write_text("\n".join(f" {line}" for line in neutral[40:100] + football[40:100]) + "\n")
    return path


@pytest.fixture(scope="module")
def sharpening() -> Steering:
    """A steering whose perplexity cost is known to grow with λ: it scales the final norm's
    output, so the random model's logits by 1 + 9λ, away from its near-uniform guesses."""
    amap = AffineMap(torch.full((32,), 10.0), torch.zeros(32), {})
    return Steering({"model.norm": amap}, SteeringInfo(support="all"))


def test_ppl_cost_on_a_growing_cost_and_as_the_perplexity_task_measures_it(
    tiny_llama, tokenizer, sharpening, text_file
):
    budget = 5000.0  # the plain perplexity is ≈ 49 400 (≈ the vocabulary), ≈ 92 500 at λ = 1
    result = calibrate(sharpening, tiny_llama, tokenizer, budget, data=text_file, **TINY)
    assert result.stopped_by == "tolerance" and 0.25 < result.strength < 0.5
    assert result.rejected - result.strength <= RELATIVE_TOLERANCE
    assert [p.strength for p in result.curve] == sorted(p.strength for p in result.curve)
    assert result.curve[0].strength == 0.0 and result.curve[0].cost == 0.0
    assert result.curve[-1].strength == 1.0  # the top was tried first
    assert result.evaluations == len(result.curve) == 8  # plain, top, 6 halvings
    assert result.forward_passes == result.evaluations  # 4 windows, one batch per evaluation
    # the perplexity task on the same tokens: within at λ, over at λ + tolerance
    options = {"data": text_file, "max_tokens": 128, "window": 32, "progress": False}
    plain = evaluate("perplexity", tiny_llama, tokenizer, **options).perplexity
    assert result.reference == pytest.approx(plain, rel=1e-6)
    at, above = (
        evaluate("perplexity", tiny_llama, tokenizer, sharpening, lam, **options).perplexity - plain
        for lam in (result.strength, result.strength + RELATIVE_TOLERANCE)
    )
    assert at == pytest.approx(result.cost, rel=1e-4) and at <= budget < above


def test_ppl_budget_above_the_top_gives_the_top_and_zero_gives_zero(
    tiny_llama, tokenizer, sharpening, text_file
):
    top = calibrate(sharpening, tiny_llama, tokenizer, 1e6, data=text_file, **TINY)
    assert (top.strength, top.rejected, top.stopped_by, top.evaluations) == (1.0, None, "range", 2)
    zero = calibrate(sharpening, tiny_llama, tokenizer, 0.0, data=text_file, **TINY)
    assert zero.strength == 0.0 and zero.cost == 0.0 and zero.rejected <= RELATIVE_TOLERANCE
    assert zero.steering.info.default_strength == 0.0
    assert (zero.stopped_by, zero.evaluations) == ("zero budget", 1), "answered at once"


def _direct_kl(model, tokenizer, steering, prompts, strength):
    """Mean over positions of KL(plain ‖ steered), one unpadded prompt at a time."""
    total, count, prefix = 0.0, 0, special_prefix(tokenizer)
    for prompt in prompts:
        ids = torch.tensor([prefix + encode(tokenizer, prompt)])
        with torch.no_grad():
            plain = model(ids).logits[0, len(prefix) :].float().log_softmax(-1)
            with steering.applied(model, strength):
                steered = model(ids).logits[0, len(prefix) :].float().log_softmax(-1)
        total += float((plain.exp() * (plain - steered)).sum())
        count += plain.shape[0]
    return total / count


def test_kl_cost_matches_a_direct_computation(tiny_llama, tokenizer, sharpening):
    prompts = ["The weather was mild today.", "A cat sat on the mat and", "Hello"]
    seen = []
    result = calibrate(
        sharpening, tiny_llama, tokenizer, 0.05, cost="kl", prompts=prompts, batch_size=2,
        on_point=lambda lam, value: seen.append((lam, value)),
    )  # fmt: skip
    assert seen and seen[0][0] == 1.0  # the top of the range first
    assert {p.strength: p.cost for p in result.curve} == {0.0: 0.0, **dict(seen)}
    assert all(p.cost >= -1e-7 for p in result.curve)  # a KL divergence
    for lam, value in seen[:2]:
        direct = _direct_kl(tiny_llama, tokenizer, sharpening, prompts, lam)
        assert value == pytest.approx(direct, rel=1e-4)
    assert result.settings["n_prompts"] == 3 and result.reference == 0.0
    assert result.stopped_by == "tolerance" and 0 < result.strength < result.rejected
    assert result.cost <= 0.05 < dict(seen)[result.rejected]


def test_unbounded_method_brackets_then_bisects(tiny_llama, tokenizer, neutral, football):
    actadd = fit(
        tiny_llama, tokenizer, source=neutral[:8], target=football[:8], method="actadd",
        modules="post-attn-ln", progress=False,
    )  # fmt: skip
    kl = {"cost": "kl", "prompts": ["The weather was mild today.", "A cat sat on the mat"]}
    top = calibrate(actadd, tiny_llama, tokenizer, 1e9, start=1.0, cap=4.0, **kl)
    assert top.stopped_by == "cap" and [p.strength for p in top.curve] == [0, 1, 2, 4]
    budget = top.curve[2].cost * 1.5  # over budget somewhere between λ = 2 and 4
    calls = []
    result = calibrate(
        actadd, tiny_llama, tokenizer, budget, cap=64.0, **kl,
        on_point=lambda lam, value: calls.append(lam),
    )  # fmt: skip
    assert calls[:3] == [1.0, 2.0, 4.0] and all(2 < lam < 4 for lam in calls[3:])
    assert result.stopped_by == "tolerance" and 2 <= result.strength < result.rejected <= 4


def test_the_chosen_lambda_is_the_default_strength_and_survives_save_and_load(
    tiny_llama, tokenizer, steering, tmp_path
):
    result = calibrate(steering, tiny_llama, tokenizer, 1e-4, cost="kl", prompts=["Hi there."])
    assert steering.info.default_strength == 1.0 and steering.info.calibration is None
    loaded = Steering.load(result.steering.save(tmp_path / "calibrated.safetensors"))
    assert loaded.info.default_strength == result.strength
    assert loaded.info.support == "all"
    saved = loaded.info.calibration
    assert saved["cost"] == "kl" and saved["budget"] == 1e-4
    assert saved["curve"] == [[p.strength, p.cost] for p in result.curve]
    assert loaded.inverse().info.calibration is None
    assert actsteer.calibrate is calibrate


def test_bad_arguments_are_clear_errors(tiny_llama, tokenizer, steering, text_file):
    cases = [
        ({"budget": -1.0}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"cost": "bleu"}, "unknown cost"),
        ({"prompts": ["x"]}, "prompts"),
        ({"cost": "kl", "data": text_file}, "data"),
        ({"data": text_file, "passages": 10_000}, "fewer than"),
        ({"cost": "kl", "prompts": [" "]}, "prompt"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ActSteerError, match=needle):
            calibrate(steering, tiny_llama, tokenizer, **{"budget": 1.0, **TINY, **kwargs})


# ---------------------------------------------------------------------------------------------
# it reads only what it is given


def test_calibration_reads_no_evaluation_data(
    tiny_llama, tokenizer, steering, text_file, tmp_path, monkeypatch
):
    """With $ACTSTEER_DATA an empty folder and every task's loader broken, calibration still
    runs on the text it is given; without a text it asks for WikiText, nothing else."""
    from actsteer.evaluation.tasks import concept, mmlu, toxicity, truthfulqa

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration read evaluation data")

    for module in (toxicity, truthfulqa, mmlu, concept):
        for name in dir(module):
            if name.startswith("load_") or name in ("read_rows", "read_jsonl"):
                monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setenv("ACTSTEER_DATA", str(tmp_path))
    result = calibrate(steering, tiny_llama, tokenizer, 1.0, data=text_file, **TINY)
    assert result.settings["data"] == str(text_file)
    with pytest.raises(ActSteerError, match="wikitext/wiki.test.raw"):
        calibrate(steering, tiny_llama, tokenizer, 1.0, **TINY)
    kl = calibrate(steering, tiny_llama, tokenizer, 1e-3, cost="kl")
    assert kl.settings["prompts"].startswith("actsteer/data/neutral.txt")
    assert kl.settings["n_prompts"] == len(package_prompts()) == 32


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def saved(tiny_llama, tokenizer, steering, tmp_path_factory):
    """The tiny model with its tokenizer in a folder, and the steering in a file."""
    folder = tmp_path_factory.mktemp("cli")
    tiny_llama.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", steering.save(folder / "steering.safetensors")


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_cli_calibrates_end_to_end_and_writes_atomically(saved, text_file, tmp_path):
    model, steering = saved
    out, curve = tmp_path / "calibrated.safetensors", tmp_path / "curve.json"
    args = ["calibrate", str(steering), "--model", str(model), "--data", str(text_file)]
    args += ["--passages", "4", "--passage-tokens", "32", "--offset", "0", "--budget-ppl", "1"]
    result = CliRunner().invoke(cli.app, [*args, "-o", str(out), "--json", str(curve)])
    assert result.exit_code == 0, result.output
    assert "Chosen λ" in result.stdout and "ΔPPL" in result.stdout
    loaded = Steering.load(out)
    content = json.loads(curve.read_text())
    assert content["strength"] == loaded.info.default_strength
    assert loaded.info.calibration["budget"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated.safetensors", "curve.json"]
    # a dry run writes nothing; --in-place replaces the input
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The weather was mild today.\nA cat sat on the mat\n")
    kl = ["--budget-kl", "1e-3", "--prompts", str(prompts)]
    dry = CliRunner().invoke(cli.app, [*args[:2], "--model", str(model), *kl])
    assert dry.exit_code == 0 and "Not saved" in dry.stdout, dry.output
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(out.read_bytes())
    inplace = CliRunner().invoke(
        cli.app,
        ["calibrate", str(copy), "--model", str(model), *kl, "--in-place"],
    )
    assert inplace.exit_code == 0, inplace.output
    assert Steering.load(copy).info.calibration["cost"] == "kl"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_rejects_bad_input_in_one_line(saved, text_file, tmp_path):
    model, steering = saved
    base = ["calibrate", str(steering), "--model", str(model)]
    cases = [
        (["--budget-ppl", "1", "--budget-kl", "0.1"], "not both"),
        (["--budget-ppl", "-1"], "budget"),
        (["--budget-kl", "nan"], "budget"),
        (["-o", str(steering)], "--in-place"),
        (["--in-place", "-o", str(tmp_path / "other.safetensors")], "--in-place"),
        (["-o", str(tmp_path / "out.bin")], ".safetensors"),
        (["--budget-kl", "0.1", "--data", str(text_file)], "--data"),
        (["--prompts", str(text_file)], "--prompts"),
        (["--tolerance", "0"], "--tolerance"),
    ]
    for extra, needle in cases:
        _one_line_error(CliRunner().invoke(cli.app, [*base, *extra]), needle)
    missing = ["calibrate", str(tmp_path / "none.safetensors")]
    _one_line_error(CliRunner().invoke(cli.app, missing), "no steering file")


# ---------------------------------------------------------------------------------------------
# module candidates


def test_module_candidates_are_fitted_calibrated_and_compared_on_held_out_texts(
    tiny_llama, tokenizer, neutral, football
):
    seen = []
    chosen = calibrate_modules(
        tiny_llama, tokenizer, neutral[:24], football[:24], ["post-attn-ln", "mlp-out"], 1e-3,
        fit_options={"support": "all"}, cost="kl", prompts=neutral[100:104],
        on_candidate=seen.append,
    )  # fmt: skip
    assert (
        [c.modules for c in chosen.candidates]
        == ["post-attn-ln", "mlp-out"]
        == [c.modules for c in seen]
    )
    assert chosen.best is max(chosen.candidates, key=lambda c: c.effect)
    assert chosen.steering is chosen.best.calibration.steering
    assert chosen.held_out["where"] == "the last quarter of each set"
    assert (chosen.held_out["source"], chosen.held_out["target"]) == (6, 6)
    for candidate in chosen.candidates:
        suffix = {"post-attn-ln": "post_attention_layernorm", "mlp-out": "mlp.down_proj"}
        names = candidate.calibration.steering.modules
        assert names and all(n.endswith(suffix[candidate.modules]) for n in names)
        assert candidate.calibration.cost <= 1e-3
    # the effect is the held-out likelihood gap's change at the calibrated λ
    best = chosen.best.calibration
    held = (neutral[18:24], football[18:24])
    with best.steering.applied(tiny_llama, best.strength):
        steered = likelihood_gap(tiny_llama, tokenizer, *held)
    plain = likelihood_gap(tiny_llama, tokenizer, *held)
    assert chosen.best.effect == pytest.approx(steered - plain, abs=1e-5)
    with pytest.raises(ActSteerError, match="candidate"):
        calibrate_modules(tiny_llama, tokenizer, neutral, football, [], 1.0)


def test_text_losses_are_the_gap_per_text(tiny_llama, tokenizer, neutral, football):
    source, target = [*neutral[30:34], "alone"], football[30:35]
    losses = {name: text_losses(tiny_llama, tokenizer, texts) for name, texts in
              (("source", source), ("target", target))}  # fmt: skip
    assert losses["source"][-1] == (0.0, 0), "a one-word text is context only"
    assert all(tokens > 0 and loss > 0 for loss, tokens in losses["source"][:-1])

    def mean(scored: list[tuple[float, int]]) -> float:
        return sum(loss for loss, _ in scored) / sum(n for _, n in scored)

    gap = likelihood_gap(tiny_llama, tokenizer, source, target)
    assert gap == pytest.approx(mean(losses["source"]) - mean(losses["target"]), abs=1e-6)
    alone = text_losses(tiny_llama, tokenizer, source[1:2])
    assert alone[0] == pytest.approx(losses["source"][1], rel=1e-5), "batching changes nothing"


def test_cli_module_candidates(saved, tmp_path, neutral, football):
    model, steering = saved
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("\n".join(neutral[:16]))
    tgt.write_text("\n".join(football[:16]))
    out = tmp_path / "best.safetensors"
    args = ["calibrate", str(steering), "--model", str(model), "--budget-kl", "1e-3"]
    args += ["--prompts", str(src)]
    args += ["--modules-candidates", "post-attn-ln,mlp-out", "--source", str(src)]
    result = CliRunner().invoke(cli.app, [*args, "--target", str(tgt), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "module candidates" in result.stdout and "← best" in result.stdout
    assert Steering.load(out).info.calibration["budget"] == 1e-3
    base = ["calibrate", str(steering), "--model", str(model)]
    _one_line_error(
        CliRunner().invoke(cli.app, [*base, "--source", str(src)]), "--modules-candidates"
    )
    _one_line_error(
        CliRunner().invoke(cli.app, [*args, "--held-out-source", str(src)]),
        "--held-out-target",
    )
