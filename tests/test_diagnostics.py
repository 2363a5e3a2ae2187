"""Which layers matter: per-module separation of source and target, and the share of token
activations inside each module's support (inspect --data)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.diagnostics import module_reports, unit_auroc


def test_unit_auroc_against_its_definition():
    generator = torch.Generator().manual_seed(0)
    positive, negative = (
        torch.randn(30, 4, generator=generator),
        torch.randn(20, 4, generator=generator),
    )
    positive[:, 0] += 10  # unit 0 separates perfectly
    auroc = unit_auroc(positive, negative)
    pairs = (positive[:, None, :] > negative[None, :, :]).double().mean((0, 1))
    assert torch.allclose(auroc, pairs) and auroc[0] == 1.0
    assert torch.equal(unit_auroc(negative, negative), torch.full((4,), 0.5)), "ties count half"


@pytest.fixture(scope="module")
def steering(tiny_llama, tokenizer, neutral, football):
    return actsteer.fit(tiny_llama, tokenizer, neutral[:40], football[:40], progress=False)


def test_reports_per_module(steering, tiny_llama, tokenizer, neutral, football):
    reports = module_reports(tiny_llama, tokenizer, steering, neutral[:40], football[:40])
    assert [r.module for r in reports] == steering.modules
    for report in reports:
        assert 0.0 <= report.separation <= report.strongest <= 1.0
        assert 0.0 < report.inside < 1.0, "a q0-100 support of pooled samples, applied per token"
    same = module_reports(tiny_llama, tokenizer, steering, neutral[:40], neutral[:40])
    assert all(r.separation == 0.0 for r in same), "identical sets do not separate"
    odd = [" ".join(["zq"] * (3 + i % 5)) for i in range(40)]
    apart = module_reports(tiny_llama, tokenizer, steering, neutral[:40], odd)
    assert all(r.separation > 0.5 and r.strongest == 1.0 for r in apart), "unlike texts separate"
    everything = module_reports(tiny_llama, tokenizer, steering, neutral[:8], support="all")
    assert all(r.inside == 1.0 and r.separation is None for r in everything)


def test_the_support_share_is_the_share_of_token_values_in_bounds(
    steering, tiny_llama, tokenizer, neutral
):
    from actsteer.capture import record

    name = steering.modules[0]
    tokens = record(tiny_llama, tokenizer, neutral[:5], [name], pooling="all", progress=False)
    lo, hi = steering.maps[name].support("q0-100")
    expected = ((tokens[name] >= lo) & (tokens[name] <= hi)).float().mean().item()
    (report, *_) = module_reports(tiny_llama, tokenizer, steering, neutral[:5])
    assert report.inside == pytest.approx(expected)


def test_cli_inspect_data_names_modules(
    steering, tiny_llama, tokenizer, neutral, football, tmp_path, monkeypatch
):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    path = steering.save(tmp_path / "s.safetensors")
    source, target = tmp_path / "s.txt", tmp_path / "t.txt"
    source.write_text("\n".join(neutral[:40]) + "\n")
    target.write_text("\n".join(football[:40]) + "\n")
    args = ["inspect", str(path), "--data", str(source), "--target", str(target)]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "separation" in result.output and "tokens inside q0-100" in result.output
    for name in steering.modules:
        assert name in result.output.split("per module on 40 --data texts")[1]


def test_cli_inspect_does_not_guess_a_relative_recorded_target(
    steering, tiny_llama, tokenizer, neutral, football, tmp_path, monkeypatch
):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("\n".join(football[:40]) + "\n")  # here, but not where fit ran
    monkeypatch.setitem(steering.info.data, "target_file", "t.txt")
    path = steering.save(tmp_path / "s.safetensors")
    (tmp_path / "s.txt").write_text("\n".join(neutral[:40]) + "\n")
    result = CliRunner().invoke(cli.app, ["inspect", str(path), "--data", "s.txt"])
    assert result.exit_code == 0, result.output
    assert "recorded relative to where it was fitted" in result.stderr
    assert "pass --target FILE" in result.stderr and "separation" not in result.stdout
