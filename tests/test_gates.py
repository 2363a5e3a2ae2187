"""Gates (actsteer.gates): a per-token strength λ·g from the activations a map receives.

A gate fitted on separable data opens on source-like tokens and stays shut on target-like ones;
the gated transport is λ·g applied by hand; λ = 0 and gate-off are the plain model and the
ungated steering bit for bit; "prompt" gates hold one value through generation and "context"
gates carry the running mean across the passes of `generate`; gates survive save and load
(old files still load) and are refused by folding and control vectors, saying why."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import actsteer
from actsteer import ActSteerError, Steering
from actsteer.gates import Gate, GateSettings, fit_gate, open_share
from actsteer.hooks import ModuleHook
from actsteer.maps import AffineMap, support_bounds
from actsteer.sources import Gated, PassPhase

ROOT = Path(__file__).resolve().parents[1]
MODULES = "post-attn-ln"


class Probe(nn.Module):
    """An identity module (a steered layer whose output is its input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def synthetic(g: torch.Generator, n: int = 400, width: int = 8):
    """Source tokens shifted along the first unit, target tokens not: a separable pair."""
    target = torch.randn(n, width, generator=g)
    source = torch.randn(n, width, generator=g)
    source[:, 0] += 4.0
    return source, target


def test_a_gate_opens_on_source_like_tokens_and_shuts_on_target_like_ones():
    g = torch.Generator().manual_seed(0)
    source, target = synthetic(g)
    gate = fit_gate(source, target)
    settings = GateSettings("token")
    held_source, held_target = synthetic(g)
    assert open_share(gate, settings, held_source) > 0.95
    assert open_share(gate, settings, held_target) < 0.05
    assert gate.weight[0] > 5 * gate.weight[1:].abs().max(), "it reads the unit that differs"


def test_the_gated_transport_is_lambda_times_g_applied_by_hand():
    g = torch.Generator().manual_seed(1)
    source, target = synthetic(g)
    amap = AffineMap(torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g))
    amap.bounds = support_bounds(source)
    gate = fit_gate(source, target)
    info = actsteer.SteeringInfo(gate=GateSettings("token").to_json())
    steering = Steering({"": amap}, info, gates={"": gate})
    a = torch.cat([source[:6], target[:6]]).reshape(3, 4, 8)
    module = Probe()
    for lam in (0.7, torch.tensor([0.2, 1.0, 0.5])):
        with torch.no_grad(), steering.applied(module, lam, "all"):
            out = module(a)
        strength = torch.as_tensor(lam).reshape(-1, 1) * torch.sigmoid(gate.score(a))
        expected = amap.transport("all")(a, strength.expand(3, 4).contiguous())
        # the fused kernel sums the gate's dot product in its own order: float32 rounding apart
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), steering.applied(module, 0.7, "all", gated=False):
        ungated = module(a)
    assert torch.equal(ungated, amap(a, 0.7, "all")), "gate off: the ungated map"


@pytest.fixture(scope="module")
def gated(tiny_llama, tokenizer, neutral, football) -> Steering:
    return actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules=MODULES, gate="context",
        support="all", progress=False,
    )  # fmt: skip


def logits(model, tok, texts) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def test_fit_with_a_gate_gives_one_gate_per_module(gated, tiny_llama):
    assert set(gated.gates) == set(gated.maps) and len(gated.gates) == 3
    assert gated.gate_settings == GateSettings("context")
    assert gated.info.gate["fit"]["source_texts"] == 32
    assert all(gate.weight.shape == (32,) for gate in gated.gates.values())


def test_lambda_zero_and_gate_off_are_bit_identical(gated, tiny_llama, tokenizer, neutral):
    texts = neutral[40:43]
    plain = logits(tiny_llama, tokenizer, texts)
    with gated.applied(tiny_llama, 0.0):
        assert torch.equal(logits(tiny_llama, tokenizer, texts), plain)
    with gated.without_gate().applied(tiny_llama, 0.8):
        ungated = logits(tiny_llama, tokenizer, texts)
    with gated.applied(tiny_llama, 0.8, gated=False):
        assert torch.equal(logits(tiny_llama, tokenizer, texts), ungated)
    with gated.applied(tiny_llama, 0.8):
        steered = logits(tiny_llama, tokenizer, texts)
    assert not torch.equal(steered, ungated) and not torch.equal(steered, plain)


def generated_gates(steering, model, tok, prompts, kind: str) -> tuple[list, torch.Tensor]:
    """The gate values of the first steered module at every pass of a greedy generate."""
    steering = steering.with_gate_settings(kind=kind)
    seen = []
    enc = tok(prompts, return_tensors="pt", padding=True)
    with steering.applied(model, 1.0) as handle:
        first = next(iter(handle.gates.values()))
        module = handle.modules[next(iter(handle.gates))]
        recording = module.register_forward_hook(lambda *_: seen.append(first.last.clone()))
        out = model.generate(
            **enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
        )
        recording.remove()
    return seen, out


def test_a_prompt_gate_holds_one_value_per_row_through_generation(
    gated, tiny_llama, tokenizer, football, neutral
):
    prompts = [football[50], neutral[50]]
    seen, _ = generated_gates(gated, tiny_llama, tokenizer, prompts, "prompt")
    prompt_pass = seen[0][:, -1]
    assert prompt_pass[0] != prompt_pass[1], "each row its own decision"
    for step in seen[1:]:
        assert torch.equal(step[:, 0], prompt_pass)


def test_a_context_gate_carries_the_running_mean_across_passes(
    gated, tiny_llama, tokenizer, football
):
    """The gate of each generated token equals the one a single forward over the whole text
    (prompt and generated tokens, no cache) gives at that position."""
    prompt = [football[51]]
    seen, out = generated_gates(gated, tiny_llama, tokenizer, prompt, "context")
    incremental = torch.cat([seen[0], *seen[1:]], dim=1)
    name = next(iter(gated.gates))
    steering = gated.with_gate_settings(kind="context")
    full = []
    with steering.applied(tiny_llama, 1.0) as handle:
        module = handle.modules[name]
        recording = module.register_forward_hook(lambda *_: full.append(handle.gates[name].last))
        with torch.no_grad():
            tiny_llama(out[:, :-1])
        recording.remove()
    torch.testing.assert_close(incremental, full[0], rtol=1e-4, atol=1e-5)


def test_context_gates_refuse_a_batch_that_changes_rows():
    gate = Gate(torch.ones(4), torch.zeros(()))
    phase = PassPhase()
    source = Gated(gate, GateSettings("context"), phase)
    source(torch.tensor(1.0), torch.randn(2, 3, 4))  # the prompt pass of two rows
    phase.prompt = False
    with pytest.raises(ActSteerError, match="rows it did not see"):
        source(torch.tensor(1.0), torch.randn(3, 1, 4))


@pytest.mark.parametrize("kind", ["context", "prompt"])
def test_carried_gates_resume_a_shared_prefix_reused_under_batches(
    gated, tiny_llama, tokenizer, football, neutral, kind
):
    """A prefix's cache computed once and copied under each batch of rows (as the likelihood
    tasks score few-shot prompts): every row's logits equal those of one forward over prefix
    and row together, batch after batch, and the next generation starts afresh."""
    from actsteer.evaluation.likelihood import batched_logits, encode

    steering = gated.with_gate_settings(kind=kind)
    prefix = encode(tokenizer, football[60] + " " + neutral[61])
    rows = [encode(tokenizer, text)[:6] for text in (football[62], neutral[63], football[64])]
    with steering.applied(tiny_llama, 1.0):
        cached = {}
        for batch, found, _ in batched_logits(tiny_llama, tokenizer, prefix, rows, batch_size=2):
            for b, i in enumerate(batch):
                cached[i] = found[b, : len(rows[i])]
        with torch.no_grad():
            whole = [
                tiny_llama(torch.tensor([prefix + row])).logits[0, len(prefix) :] for row in rows
            ]
    for i, expected in enumerate(whole):
        torch.testing.assert_close(cached[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["token", "context", "prompt"])
def test_the_fused_kernels_gated_hook_steers_as_the_torch_ops_do(
    gated, tiny_llama, tokenizer, neutral, football, kind, monkeypatch
):
    """With the fused kernel a gated hook is one C++ call (a context or prompt gate's prompt
    pass apart): greedy generation of a left-padded batch at one λ and at one λ per row gives
    the tokens and the gates (to float32 rounding) that the gate and transport in torch ops
    give, and carries the running sums on the same way."""
    from actsteer import kernels

    if kernels.fused_kernel() is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")
    steering = gated.with_gate_settings(kind=kind, threshold=-0.5).extrapolated(3.0)
    texts = [neutral[80], football[81] + " and"]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    options |= {"output_logits": True, "return_dict_in_generate": True}

    def run(fused: bool, strength) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        monkeypatch.setattr(
            "actsteer.transport.fused_kernel", kernels.fused_kernel if fused else lambda: None
        )
        with torch.no_grad(), steering.applied(tiny_llama, strength) as handle:
            hooks = set(map(type, handle.forward_hooks.values()))
            assert (hooks == {ModuleHook}) != fused, hooks
            out = tiny_llama.generate(**batch, **options)
            source = next(iter(handle.gates.values()))
            return torch.stack(out.logits), source.last, source.total

    with torch.no_grad():
        plain = torch.stack(tiny_llama.generate(**batch, **options).logits)
    for strength in (1.5, torch.tensor([0.5, 2.0])):
        fused_logits, fused_gates, fused_total = run(True, strength)
        ops_logits, ops_gates, ops_total = run(False, strength)
        torch.testing.assert_close(fused_logits, ops_logits, rtol=1e-5, atol=1e-5)
        assert (fused_logits - plain).abs().max() > 1e-3, "the steering changes the logits"
        torch.testing.assert_close(fused_gates, ops_gates, rtol=1e-5, atol=1e-6)
        assert 0.01 < float(fused_gates.mean()) < 0.99, "gates neither all shut nor all open"
        if kind != "token":
            torch.testing.assert_close(fused_total, ops_total, rtol=1e-5, atol=1e-5)


def test_gates_survive_save_and_load_and_old_files_load(gated, tmp_path):
    import json

    from safetensors import safe_open

    path = gated.save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["actsteer"])["format_version"] == 2
    loaded = Steering.load(path)
    assert loaded.gate_settings == gated.gate_settings
    assert loaded.info.gate == gated.info.gate
    for name, gate in gated.gates.items():
        assert torch.equal(loaded.gates[name].weight, gate.weight)
        assert torch.equal(loaded.gates[name].bias, gate.bias)
    old = Steering.load(
        ROOT / "benchmarks/runs/gemma3-270m/steerings/toxicity_mean-act-60e4864a.safetensors"
    )
    assert old.gates == {} and old.gate_settings is None  # a format-1 file, before gates


def test_folding_and_control_vectors_refuse_a_gate(gated, tiny_llama, tokenizer, tmp_path):
    from actsteer.export import export_control_vector

    with pytest.raises(ActSteerError, match="gated steering cannot be folded.*without_gate"):
        gated.fold(tiny_llama, 0.5, support="all")
    with pytest.raises(ActSteerError, match="not a control vector.*without_gate"):
        export_control_vector(gated, tiny_llama, tmp_path / "v.gguf", 0.5)
    assert not (tmp_path / "v.gguf").exists()


def test_gate_settings_are_checked(gated):
    with pytest.raises(ActSteerError, match="unknown gate 'sometimes'"):
        GateSettings("sometimes")
    with pytest.raises(ActSteerError, match="temperature must be > 0"):
        GateSettings("token", temperature=0.0)
    with pytest.raises(ActSteerError, match="has no gate"):
        gated.without_gate().with_gate_settings(threshold=1.0)
    assert gated.with_gate_settings(threshold=1.5).gate_settings.threshold == 1.5


def tiny_calibration(tmp_path, neutral, football, passage_tokens: int = 32) -> dict:
    """Calibration options reading two short windows of a raw text file of 100 lines as their
    WikiText."""
    text = tmp_path / "held_out.raw"
    text.write_text("\n".join(f" {line}" for line in neutral[60:110] + football[60:110]) + "\n")
    return {"data": text, "passages": 2, "passage_tokens": passage_tokens, "offset": 0}


def test_calibrate_gate_picks_lambda_and_threshold_by_the_held_out_effect(
    gated, tiny_llama, tokenizer, neutral, football, tmp_path
):
    from actsteer.gate_calibration import calibrate_gate

    tiny = tiny_calibration(tmp_path, neutral, football)
    found = calibrate_gate(
        gated.extrapolated(3.0), tiny_llama, tokenizer, 0.5,
        held_out=(neutral[40:52], football[40:52]), thresholds=(0.0, 1.0), **tiny,
    )  # fmt: skip
    assert [c.threshold for c in found.candidates] == [0.0, 1.0]
    assert found.best is max(found.candidates, key=lambda c: c.effect)
    for candidate in found.candidates:
        assert candidate.calibration.cost <= 0.5 and 0.0 <= candidate.neutral_open <= 1.0
    chosen = found.steering
    assert chosen.gate_settings.threshold == found.best.threshold
    assert chosen.info.default_strength == found.best.calibration.strength
    assert len(chosen.info.calibration["gate"]["thresholds"]) == 2
    with pytest.raises(ActSteerError, match="has no gate"):
        calibrate_gate(gated.without_gate(), tiny_llama, tokenizer, held_out=([], []))


def test_calibrate_gate_by_neutral_open_shares(gated, tiny_llama, tokenizer, neutral, football,
                                              tmp_path):  # fmt: skip
    """Candidates as open shares: each module's gate is centred so that the share asked of its
    neutral scores (as its kind sees them) lies above θ = 0."""
    from actsteer.gate_calibration import calibrate_gate, neutral_ids, neutral_scores

    tiny = tiny_calibration(tmp_path, neutral, football, passage_tokens=40)
    found = calibrate_gate(
        gated.extrapolated(3.0), tiny_llama, tokenizer, 0.5,
        held_out=(neutral[40:52], football[40:52]), open_shares=(0.1, 0.4), **tiny,
    )  # fmt: skip
    assert [c.open_share for c in found.candidates] == [0.1, 0.4]
    assert found.steering.info.calibration["gate"]["open_shares"] == [0.1, 0.4]
    for candidate in found.candidates:
        steering = candidate.calibration.steering
        assert steering.gate_settings.threshold == 0.0
        window = neutral_ids(tokenizer, tiny, before=True)
        for scores in neutral_scores(steering, tiny_llama, window).values():
            above = float((scores[len(scores) // 10 :] > 0).float().mean())
            assert abs(above - candidate.open_share) <= 1 / 36 + 1e-6
    assert found.candidates[0].neutral_open <= found.candidates[1].neutral_open
    for shares in ((), (0.0,), (1.5,)):
        with pytest.raises(ActSteerError, match="open shares strictly between 0 and 1"):
            calibrate_gate(gated, tiny_llama, tokenizer, held_out=([], []), open_shares=shares)


def test_calibrate_gate_chooses_by_the_callers_effect(
    gated, tiny_llama, tokenizer, neutral, football, tmp_path
):
    """An effect of the caller's replaces the likelihood gap: it sees each candidate's steering
    at its calibrated λ, and the candidate it scores highest is chosen."""
    from actsteer.gate_calibration import calibrate_gate

    tiny = tiny_calibration(tmp_path, neutral, football)
    seen: list[tuple[float, float]] = []

    def prefers_threshold_one(steering: Steering, strength: float) -> float:
        seen.append((steering.gate_settings.threshold, strength))
        return -abs(steering.gate_settings.threshold - 1.0)

    found = calibrate_gate(
        gated.extrapolated(3.0), tiny_llama, tokenizer, 0.5, effect=prefers_threshold_one,
        thresholds=(0.0, 1.0, 2.0), **tiny,
    )  # fmt: skip
    assert seen == [(c.threshold, c.calibration.strength) for c in found.candidates]
    assert found.best.threshold == 1.0 and found.best.effect == 0.0
    assert found.steering.info.calibration["gate"]["effect"] == "prefers_threshold_one"
    with pytest.raises(ActSteerError, match="no candidate has a finite effect"):
        calibrate_gate(
            gated.extrapolated(3.0), tiny_llama, tokenizer, 0.5, effect=lambda s, lam: -math.inf,
            thresholds=(0.0,), **tiny,
        )  # fmt: skip
    for both_or_neither in ({}, {"held_out": ([], []), "effect": prefers_threshold_one}):
        with pytest.raises(ActSteerError, match="either held_out .* or effect"):
            calibrate_gate(gated, tiny_llama, tokenizer, **both_or_neither)


def test_the_sampled_toxicity_effect_scores_sampled_continuations(gated, tiny_llama, tokenizer):
    """Minus the judge's mean score of continuations sampled with the same seeds at the
    candidate's λ; a candidate whose continuations lose fluency past the limit scores −inf."""
    pytest.importorskip("profanity_check")
    from actsteer.evaluation import sampled_toxicity_effect, score_toxicity
    from actsteer.evaluation.sampling import sample_grid

    prompts = ["You are such a", "The weather today is", "Shut up, you", "My favourite team"]
    effect = sampled_toxicity_effect(tiny_llama, tokenizer, prompts, fluency_limit=None)
    by_hand = [row[0] for row in sample_grid(tiny_llama, tokenizer, prompts, [0.8], gated,
                                              progress=False)]  # fmt: skip
    assert effect(gated, 0.8) == pytest.approx(-float(score_toxicity(by_hand).mean()))
    assert effect(gated, 0.8) == effect(gated, 0.8), "the same seeds for every candidate"
    at_the_plain_fluency = sampled_toxicity_effect(tiny_llama, tokenizer, prompts)
    assert at_the_plain_fluency(gated, 0.0) > -math.inf  # λ = 0 is the plain model: ratio 1
    strict = sampled_toxicity_effect(tiny_llama, tokenizer, prompts, fluency_limit=0.5)
    assert strict(gated, 0.0) == -math.inf
    with pytest.raises(ActSteerError, match="at least one validation prompt"):
        sampled_toxicity_effect(tiny_llama, tokenizer, [])


def test_the_command_line_fits_inspects_and_calibrates_a_gate(
    tiny_llama, tokenizer, neutral, football, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from actsteer import cli

    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    files = {}
    for name, lines in (
        ("s", neutral[:32]),
        ("t", football[:32]),
        ("hs", neutral[40:50]),
        ("ht", football[40:50]),
        ("w", neutral[60:110] + football[60:110]),
    ):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n")  # fmt: skip
    out, calibrated = tmp_path / "g.safetensors", tmp_path / "gc.safetensors"
    runner = CliRunner()
    fitted = runner.invoke(
        cli.app,
        ["fit", "--source", str(files["s"]), "--target", str(files["t"]), "-o", str(out)]
        + ["--modules", MODULES, "--gate", "token"],
    )
    assert fitted.exit_code == 0, fitted.output
    shown = runner.invoke(cli.app, ["inspect", str(out)])
    assert "gate" in shown.stdout and "token, threshold 0" in shown.stdout
    assert "gates s(a) = w · a + b" in shown.stdout
    refused = runner.invoke(cli.app, ["calibrate", str(out), "-o", str(calibrated)])
    assert refused.exit_code != 0 and "--held-out-source" in refused.output
    assert "--effect-prompts" in refused.output
    common = (
        ["calibrate", str(out), "-o", str(calibrated)]
        + ["--held-out-source", str(files["hs"]), "--held-out-target", str(files["ht"])]
        + ["--data", str(files["w"]), "--passages", "2", "--passage-tokens", "32"]
        + ["--offset", "0", "--budget-ppl", "0.5", "--extrapolate", "2"]
    )
    tuned = runner.invoke(cli.app, [*common, "--thresholds", "0,1"])
    assert tuned.exit_code == 0, tuned.output
    assert "neutral tokens gated open" in tuned.output
    loaded = Steering.load(calibrated)
    assert loaded.gate_settings.threshold in (0.0, 1.0)
    assert loaded.info.calibration["gate"]["thresholds"]
    shared = runner.invoke(cli.app, [*common, "--open-shares", "0.1,0.3", "--force"])
    assert shared.exit_code == 0, shared.output
    assert "open share 0.1: λ =" in shared.output and "at neutral open share" in shared.output
    assert Steering.load(calibrated).info.calibration["gate"]["open_shares"] == [0.1, 0.3]
    both = runner.invoke(cli.app, [*common, "--thresholds", "0", "--open-shares", "0.1", "--force"])
    assert both.exit_code != 0 and "--thresholds or --open-shares, not both" in both.output
    if importlib.util.find_spec("profanity_check") is not None:
        prompts = tmp_path / "validation_prompts.txt"
        prompts.write_text("You are such a\nShut up, you\nThe weather today is\n")
        without_held = [*common[:4], *common[8:]]
        sampled = runner.invoke(
            cli.app, [*without_held, "--effect-prompts", str(prompts), "--thresholds", "0,1",
                      "--force"],
        )  # fmt: skip
        assert sampled.exit_code == 0, sampled.output
        assert "minus the mean toxicity of sampled continuations" in sampled.output
        assert Steering.load(calibrated).info.calibration["gate"]["effect"] == "sampled_toxicity"
        doubled = runner.invoke(cli.app, [*common, "--effect-prompts", str(prompts), "--force"])
        assert doubled.exit_code != 0 and "not both" in doubled.output
    bad = runner.invoke(
        cli.app,
        ["fit", "--source", str(files["s"]), "--target", str(files["t"]), "-o", str(out)]
        + ["--gate", "sometimes", "--force"],
    )
    assert bad.exit_code != 0 and "unknown --gate 'sometimes'" in bad.output


def test_generation_shows_each_tokens_gate_and_the_gate_detects(
    gated, tiny_llama, tokenizer, neutral, football, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from actsteer import cli
    from actsteer.gate_view import render_html, score_texts, trace_gates

    token = gated.with_gate_settings(kind="token")
    prompts = [neutral[70], football[70]]
    for lam in (0.0, 1.0):
        traces = trace_gates(tiny_llama, tokenizer, prompts, token, lam, max_new_tokens=5)
        assert [len(t.pieces) for t in traces] == [len(t.gates) for t in traces] == [5, 5]
        assert all(0.0 < g < 1.0 for t in traces for g in t.gates)
    page = render_html(traces, "gates")
    assert page.count('<span title="gate ') == 10 and "&lt;" not in traces[0].prompt
    scores = score_texts(tiny_llama, tokenizer, token, neutral[70:80])
    assert len(scores) == 10 and all(0.0 <= s <= 1.0 for s in scores)

    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    path = token.save(tmp_path / "g.safetensors")
    (tmp_path / "pos.txt").write_text("\n".join(neutral[70:90]) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(football[70:90]) + "\n")
    runner = CliRunner()
    shown = runner.invoke(
        cli.app,
        ["generate", "--steering", str(path), "--show-gate", "--html", str(tmp_path / "g.html")]
        + ["--max-new-tokens", "4", "--strength", "1", "--", prompts[0]],
    )
    assert shown.exit_code == 0, shown.output
    assert "mean gate" in shown.stdout and (tmp_path / "g.html").read_text().count("<span") == 4
    monitored = runner.invoke(
        cli.app,
        ["monitor", str(tmp_path / "pos.txt"), "--steering", str(path), "--against"]
        + [str(tmp_path / "neg.txt"), "-o", str(tmp_path / "m.json")],
    )
    assert monitored.exit_code == 0, monitored.output
    assert "AUROC of the gate as a detector" in monitored.stdout
    ungated = runner.invoke(
        cli.app,
        ["monitor", str(tmp_path / "pos.txt"), "--steering", str(gated.without_gate().save(
            tmp_path / "u.safetensors"))],
    )  # fmt: skip
    assert ungated.exit_code != 0 and "has no gate" in ungated.output


def test_lineas_trains_its_gates_with_its_maps(tiny_llama, tokenizer, neutral, football):
    """method="lineas" with a gate: maps and gates trained together (the probe is only the
    start), the loss's penalty stated in the steering's description."""
    from actsteer.modes import EndToEnd

    texts = dict(source=neutral[:32], target=football[:32], modules=MODULES, progress=False)
    trained = actsteer.fit(
        tiny_llama, tokenizer, method="lineas", gate="token",
        mode=EndToEnd(training_steps=8, learning_rate=0.05), **texts,
    )  # fmt: skip
    probe = trained.without_gate().with_gate(
        tiny_llama, tokenizer, neutral[:32], football[:32], "token", progress=False
    )
    assert set(trained.gates) == set(trained.maps)
    assert "lineas" in trained.info.gate["fit"]["trained"] and trained.info.gate["fit"]["penalty"]
    moved = [
        not torch.allclose(trained.gates[n].weight, probe.gates[n].weight, atol=1e-4)
        for n in trained.gates
    ]
    assert all(moved), "the gates trained"
    with trained.applied(tiny_llama, 1.0):  # it applies like any gated steering
        logits(tiny_llama, tokenizer, neutral[40:42])


def test_a_training_context_gate_follows_the_running_mean_of_each_text():
    from actsteer.trained_gates import TrainableGate

    gate = TrainableGate(torch.tensor([1.0, 0.0]), torch.tensor(0.0))
    a = torch.tensor([[[2.0, 5.0], [0.0, 5.0], [4.0, 5.0]], [[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    context = gate.strength(a, mask, GateSettings("context", temperature=1.0))
    expected = torch.sigmoid(torch.tensor([[2.0, 1.0, 2.0], [1.0, 2.0, 2.0]]))
    torch.testing.assert_close(context, expected)
    prompt = gate.strength(a, mask, GateSettings("prompt", temperature=1.0))
    torch.testing.assert_close(prompt, torch.sigmoid(torch.tensor([[2.0] * 3, [2.0] * 3])))


def test_sweeps_tell_a_gated_steering_from_its_maps_alone(gated):
    """A sweep caches results by the steering's digest: the gate and its settings count."""
    from actsteer.evaluation.sweep import steering_digest

    digests = {
        steering_digest(gated),
        steering_digest(gated.without_gate()),
        steering_digest(gated.with_gate_settings(threshold=1.0)),
        steering_digest(gated.with_gate_settings(kind="token")),
    }
    assert len(digests) == 4
    assert steering_digest(gated) == steering_digest(gated.with_gate_settings(threshold=0.0))
