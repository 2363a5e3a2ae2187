"""`actsteer eval`, `sweep`, `plot` and `inspect --plot` on the real SmolLM2-135M, kept tiny.

The CLI's loader is patched to hand out the session model (as in test_cli.py); perplexity runs
on 256 tokens, so each evaluation is a couple of forward passes.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from actsteer import cli
from actsteer.evaluation.inspect_plot import short_names, steering_figure, top_units
from actsteer.fitting import fit
from actsteer.maps import AffineMap
from actsteer.steering import Steering

pytestmark = pytest.mark.slow

TINY = ["--set", "max_tokens=256", "--set", "window=128"]
TINIER = ["--set", "max_tokens=128"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def shared_model(smol, monkeypatch):
    """Every command gets the session's model instead of loading its own."""
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: smol)
    return smol


@pytest.fixture(scope="module")
def steering_path(smol, neutral, football, tmp_path_factory) -> Path:
    """A Linear-AcT steering (neutral → football, post-attention layer norms), saved once."""
    model, tok = smol
    steering = fit(
        model,
        tok,
        source=[t for t in neutral if t.strip()][:16],
        target=[t for t in football if t.strip()][:16],
        modules="post-attn-ln",
        support="all",
        progress=False,
    )
    return steering.save(tmp_path_factory.mktemp("steer") / "football.safetensors")


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and a check of its signature)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_eval_perplexity_prints_table_and_writes_json(runner, steering_path, tmp_path):
    out = tmp_path / "ppl.json"
    result = runner.invoke(
        cli.app,
        ["eval", "perplexity", "--steering", str(steering_path), "--strength", "0", "1"]
        + TINY
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout
    content = json.loads(out.read_text())
    # The data actually read ($ACTSTEER_DATA's WikiText-2 test file) is in each result.
    assert content["results"][0]["result"]["settings"]["data"].endswith("wikitext/wiki.test.raw")
    assert content["task"] == "perplexity"
    assert [r["strength"] for r in content["results"]] == [0.0, 1.0]
    plain, steered = (r["metrics"]["perplexity"] for r in content["results"])
    assert 5 < plain < 200 and steered != plain
    assert content["options"] == {"max_tokens": 256, "window": 128}
    assert 250 <= content["results"][0]["result"]["n_tokens"] <= 256
    assert f"{plain:.4g}" in result.stdout and f"{steered:.4g}" in result.stdout


def test_eval_plain_model_and_range_strengths(runner, steering_path):
    result = runner.invoke(cli.app, ["eval", "perplexity", *TINIER])
    assert result.exit_code == 0, result.output
    assert "(plain)" in result.stdout
    result = runner.invoke(
        cli.app, ["eval", "perplexity", "--steering", str(steering_path), "-s", "0:1:0.5", *TINIER]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if "│" in line]
    assert rows[-3:] == ["0", "0.5", "1"]


def test_eval_errors_are_one_line(runner, steering_path):
    _assert_one_line_error(runner.invoke(cli.app, ["eval", "nope"]), "unknown task", "perplexity")
    _assert_one_line_error(
        runner.invoke(cli.app, ["eval", "perplexity", "--set", "bogus=1"]), "bogus"
    )
    _assert_one_line_error(
        runner.invoke(cli.app, ["eval", "perplexity", "--strength", "1"]), "--steering"
    )
    _assert_one_line_error(
        runner.invoke(cli.app, ["sweep", "--task", "nope", "--out", "x.json"]), "unknown task"
    )


def test_sweep_writes_json_and_png_then_resumes_and_plot_redraws(runner, steering_path, tmp_path):
    out = tmp_path / "sweep.json"
    args = ["sweep", "--task", "perplexity", "--steering", f"linear={steering_path}"]
    args += ["--strength", "0:1:1", "--set", "perplexity.max_tokens=128", "--set"]
    args += ["window=64", "--out", str(out)]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "3 new point(s), 0 of 3 already there" in result.stdout
    png = tmp_path / "sweep_perplexity.png"
    assert f"plot: {png}" in result.stdout
    width, height = _png_size(png)
    assert width > 400 and height > 300
    content = json.loads(out.read_text())
    assert {(e["steering"], e["strength"]) for e in content["entries"]} == {
        ("original", 0.0),
        ("linear", 0.0),
        ("linear", 1.0),
    }
    before = out.read_text()

    start = time.perf_counter()
    again = runner.invoke(cli.app, args)
    assert again.exit_code == 0, again.output
    assert "0 new point(s), 3 of 3 already there (skipped)" in again.stdout
    assert time.perf_counter() - start < 10
    assert json.loads(out.read_text())["entries"] == json.loads(before)["entries"]

    png.unlink()
    redraw = runner.invoke(cli.app, ["plot", str(out)])
    assert redraw.exit_code == 0, redraw.output
    assert f"Saved {png}" in redraw.stdout
    assert _png_size(png)[0] > 400


def test_sweep_plain_numbers_and_no_baseline(runner, steering_path, tmp_path):
    out = tmp_path / "s.json"
    result = runner.invoke(
        cli.app,
        ["sweep", "-t", "perplexity", "--steering", str(steering_path), "--no-baseline"]
        + ["--strength", "0", "0.5", "--set", "max_tokens=128", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())["entries"]
    assert [(e["steering"], e["strength"]) for e in entries] == [
        ("football", 0.0),
        ("football", 0.5),
    ]


def test_sweep_beyond_the_range_only_when_asked(runner, steering_path, tmp_path):
    out = tmp_path / "beyond.json"
    args = ["sweep", "-t", "perplexity", "--steering", str(steering_path), "--no-baseline"]
    args += ["--strength", "1.25", "--set", "max_tokens=64", "--out", str(out)]
    _assert_one_line_error(runner.invoke(cli.app, args), "--extrapolate UPPER")
    result = runner.invoke(cli.app, [*args, "--extrapolate", "1.25"])
    assert result.exit_code == 0, result.output
    assert [e["strength"] for e in json.loads(out.read_text())["entries"]] == [1.25]


def test_plot_errors(runner, tmp_path):
    _assert_one_line_error(runner.invoke(cli.app, ["plot", str(tmp_path / "no.json")]), "found")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    _assert_one_line_error(runner.invoke(cli.app, ["plot", str(bad)]), "not an actsteer sweep")


def test_inspect_plot_writes_png(runner, steering_path, tmp_path, neutral):
    png = tmp_path / "maps.png"
    result = runner.invoke(cli.app, ["inspect", str(steering_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert f"Saved the figure to {png}" in result.stdout
    width, height = _png_size(png)
    assert 800 < width < 3000 and 300 < height < 2000

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(neutral[:8]) + "\n")
    png2 = tmp_path / "units.png"
    result = runner.invoke(
        cli.app,
        ["inspect", str(steering_path), "--plot", str(png2), "--data", str(texts)]
        + ["--max-length", "32"],
    )
    assert result.exit_code == 0, result.output
    width2, height2 = _png_size(png2)
    assert width2 > 800 and height2 > height  # the histogram row makes it taller

    table = runner.invoke(cli.app, ["inspect", str(steering_path), "--data", str(texts)])
    assert table.exit_code == 0 and "tokens inside" in table.output  # --data alone: the table
    _assert_one_line_error(
        runner.invoke(
            cli.app, ["inspect", str(steering_path), "--plot", str(png), "--module", "x"]
        ),
        "not steered",
    )


def test_inspect_plot_helpers():
    names = [f"model.layers.{i}.post_attention_layernorm" for i in range(3)]
    assert short_names(names) == ["0", "1", "2"]
    assert short_names(["a.x", "a.y.z"]) == ["x", "y.z"]
    omega = torch.ones(6)
    beta = torch.tensor([0.0, 3.0, 0.0, 0.0, 0.1, 0.0])
    omega[2] = 5.0
    amap = AffineMap(omega, beta)
    samples = torch.randn(50, 6)
    assert top_units(amap, samples, 2) == [2, 1]
    steering = Steering({n: amap for n in names})
    figure = steering_figure(steering, samples, names[0], support="all", units=4)
    assert len(figure.axes) == 6


def test_eval_shows_intervals(runner, tmp_path):
    out = tmp_path / "tqa.json"
    result = runner.invoke(
        cli.app,
        ["eval", "truthfulqa", "--set", "n_questions=2", "--set", "preprompt=", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    content = json.loads(out.read_text())
    low, high = content["results"][0]["intervals"]["mc1"]
    mc1 = content["results"][0]["metrics"]["mc1"]
    assert low <= mc1 <= high
    assert f"{mc1:.4g} [{low:.4g}, {high:.4g}]" in result.stdout
