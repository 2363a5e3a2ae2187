"""The calibrate command: the largest λ within a quality budget, stored as default strength."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from actsteer.choices import CALIBRATION_CAP as CAP
from actsteer.choices import CALIBRATION_PASSAGES as PASSAGES
from actsteer.choices import PERPLEXITY_TOKENS as OFFSET
from actsteer.choices import PERPLEXITY_WINDOW as PASSAGE_TOKENS
from actsteer.cli.core import EVAL_PANEL, app, console, load_lm, read_texts, status
from actsteer.cli.options import (
    DeviceOption,
    DtypeOption,
    ExtrapolateOption,
    ForceOption,
    ModelOption,
    SupportOption,
)
from actsteer.errors import ActSteerError
from actsteer.outputs import check_output, written_file

if TYPE_CHECKING:
    from actsteer.calibration import CalibrationResult, ModulesCalibration
    from actsteer.gate_calibration import GateCalibration
    from actsteer.steering import Steering


def curve_table(result: CalibrationResult, title: str) -> Table:
    """Rows = the evaluated λ (sorted), their cost, and whether it is within the budget."""
    table = Table(title=title, min_width=min(len(title) + 4, 120))
    table.add_column("λ", justify="right", style="bold")
    table.add_column(result.label, justify="right")
    if result.cost_name == "ppl":
        table.add_column("PPL", justify="right")
    table.add_column(f"≤ {result.budget:g}", justify="center")
    for point in result.curve:
        row = [f"{point.strength:.4g}", f"{point.cost:+.4f}" if point.strength else "0 (plain)"]
        if result.cost_name == "ppl":
            row.append(f"{result.reference + point.cost:.3f}")
        mark = "yes" if point.within else "no"
        row.append(f"{mark}  ← chosen" if point.strength == result.strength else mark)
        table.add_row(*row)
    return table


def _budget(budget_ppl: float | None, budget_kl: float | None) -> tuple[str, float]:
    from actsteer.calibration import check_budget

    if budget_ppl is not None and budget_kl is not None:
        raise ActSteerError("give one budget: --budget-ppl or --budget-kl, not both")
    cost, budget = ("kl", budget_kl) if budget_kl is not None else ("ppl", budget_ppl)
    budget = 1.0 if budget is None else budget
    check_budget(budget, cost)
    return cost, budget


def _output(steering_path: Path, output: Path | None, in_place: bool) -> Path | None:
    if in_place and output is not None and output.resolve() != steering_path.resolve():
        raise ActSteerError("--in-place overwrites STEERING; drop -o, or drop --in-place")
    output = steering_path if in_place else output
    if output is None:
        return None
    if output.suffix != ".safetensors":
        raise ActSteerError(f"--output should end in .safetensors, got {output}")
    if not in_place and output.resolve() == steering_path.resolve():
        raise ActSteerError(f"-o {output} is the input steering; pass --in-place to overwrite it")
    return output


def _candidates(
    spec: str | None,
    source: Path | None,
    target: Path | None,
    held_source: Path | None,
    held_target: Path | None,
) -> dict[str, Any] | None:
    """The module candidates and their text files, checked (None without --modules-candidates)."""
    files = {"--source": source, "--target": target, "--held-out-source": held_source}
    files["--held-out-target"] = held_target
    if spec is None:
        given = [name for name, value in files.items() if value is not None]
        if given:
            raise ActSteerError(f"{', '.join(given)} go with --modules-candidates")
        return None
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ActSteerError("--modules-candidates needs presets or regexes, e.g. a,b")
    if (held_source is None) != (held_target is None):
        raise ActSteerError("give both --held-out-source and --held-out-target, or neither")
    return {"names": names, "files": files}


def _calibrate_candidates(
    steering: Steering,
    lm: Any,
    tok: Any,
    budget: float,
    candidates: dict[str, Any],
    options: dict[str, Any],
) -> ModulesCalibration:
    """Refit STEERING's method on each candidate and calibrate each; print the comparison."""
    from actsteer.calibration import calibrate_modules

    files, info = candidates["files"], steering.info
    for option, key in (("--source", "source_file"), ("--target", "target_file")):
        recorded = info.data.get(key)
        if files[option] is None:
            if recorded is None:
                raise ActSteerError(f"STEERING records no {key}: give {option} FILE")
            files[option] = Path(str(recorded))
    held_out = None
    if files["--held-out-source"] is not None:
        held_out = (
            read_texts(files["--held-out-source"], "held-out source"),
            read_texts(files["--held-out-target"], "held-out target"),
        )
    fit_options = {
        "method": info.method, "mode": info.mode, "pooling": info.pooling,
        "support": info.support, "max_length": info.max_length or 128,
        "data": {"source_file": str(files["--source"]), "target_file": str(files["--target"])},
    }  # fmt: skip
    status(f"Fitting {info.method} on {len(candidates['names'])} module candidates …")
    chosen = calibrate_modules(
        lm, tok, read_texts(files["--source"], "source"), read_texts(files["--target"], "target"),
        candidates["names"], budget, held_out=held_out, fit_options=fit_options,
        on_candidate=lambda c: status(
            f"  {c.modules}: λ = {c.calibration.strength:.4g}, effect {c.effect:+.4f}"
        ),
        **options,
    )  # fmt: skip
    table = Table(title=f"module candidates at {chosen.best.calibration.label} ≤ {budget:g}")
    for column in ("modules", "maps", "λ", chosen.best.calibration.label, "effect (nats)"):
        table.add_column(column, justify="left" if column == "modules" else "right")
    for c in chosen.candidates:
        mark = "  ← best" if c is chosen.best else ""
        table.add_row(
            c.modules, str(len(c.calibration.steering.maps)), f"{c.calibration.strength:.4g}",
            f"{c.calibration.cost:+.4f}", f"{c.effect:+.4f}{mark}",
        )  # fmt: skip
    console().print(table)
    return chosen


def _calibrate_gate(
    steering: Steering,
    lm: Any,
    tok: Any,
    budget: float,
    held: tuple[Path, Path] | None,
    effect_prompts: Path | None,
    thresholds: str | None,
    open_shares: str | None,
    options: dict[str, Any],
) -> GateCalibration:
    """A gated steering's λ and threshold (actsteer.gate_calibration), each threshold's outcome
    on stderr; the effect: the held-out likelihood gap, or the sampled toxicity of
    `effect_prompts`."""
    from actsteer.evaluation.tasks.toxicity import sampled_toxicity_effect
    from actsteer.gate_calibration import THRESHOLDS, calibrate_gate

    try:
        tried = THRESHOLDS if thresholds is None else [float(t) for t in thresholds.split(",")]
    except ValueError:
        raise ActSteerError(f"--thresholds takes numbers like -1,0,1, got {thresholds!r}") from None
    try:
        shares = None if open_shares is None else [float(q) for q in open_shares.split(",")]
    except ValueError:
        raise ActSteerError(
            f"--open-shares takes shares like 0.05,0.1,0.2, got {open_shares!r}"
        ) from None
    selection: dict[str, Any]
    if effect_prompts is not None:
        prompts = read_texts(effect_prompts, "--effect-prompts")
        selection = {"effect": sampled_toxicity_effect(lm, tok, prompts)}
        effect = "minus the mean toxicity of sampled continuations"
    else:
        assert held is not None  # the command refuses neither
        texts = read_texts(held[0], "held-out source"), read_texts(held[1], "held-out target")
        selection, effect = {"held_out": texts}, "held-out effect (nats)"
    return calibrate_gate(
        steering, lm, tok, budget, thresholds=tried, open_shares=shares,
        on_candidate=lambda c: status(
            (f"open share {c.open_share:g}" if c.open_share is not None
             else f"threshold {c.threshold:g}")
            + f": λ = {c.calibration.strength:.4g}, {effect} {c.effect:+.4f}, "
            f"neutral tokens gated open {c.neutral_open:.1%}"
        ),
        **selection, **options,
    )  # fmt: skip


def _candidates_json(chosen: ModulesCalibration) -> dict[str, Any]:
    rows = [
        {"modules": c.modules, "maps": len(c.calibration.steering.maps), "effect": c.effect,
         "strength": c.calibration.strength, "cost": c.calibration.cost}
        for c in chosen.candidates
    ]  # fmt: skip
    return {"best": chosen.best.modules, "held_out": chosen.held_out, "candidates": rows}


@app.command("calibrate", rich_help_panel=EVAL_PANEL)
def calibrate_command(
    steering_path: Annotated[
        Path,
        typer.Argument(
            help="A steering file from `actsteer fit`, its save_pretrained folder or hf:USER/REPO.",
            metavar="STEERING",
        ),
    ],
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    budget_ppl: Annotated[
        float | None,
        typer.Option(
            "--budget-ppl",
            help="Perplexity points the steering may add on held-out WikiText (the paper's "
            "rule: 1.0, the default).",
            metavar="ΔPPL",
        ),
    ] = None,
    budget_kl: Annotated[
        float | None,
        typer.Option(
            "--budget-kl",
            help="Instead: mean KL(plain ‖ steered) of next-token distributions on neutral "
            "prompts, in nats.",
            metavar="NATS",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="The perplexity text: a raw text file, or hf:ID[:CONFIG[:SPLIT]]. Default: "
            "WikiText-2 test ($ACTSTEER_DATA/wikitext/wiki.test.raw, else the hub).",
            metavar="PATH",
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="--budget-kl: the prompts, one per line. Default: the last 32 of the "
            "package's neutral sentences.",
            metavar="FILE",
        ),
    ] = None,
    passages: Annotated[int, typer.Option(help="Perplexity windows scored.", min=1)] = PASSAGES,
    passage_tokens: Annotated[
        int, typer.Option(help="Tokens per perplexity window.", min=2)
    ] = PASSAGE_TOKENS,
    offset: Annotated[
        int,
        typer.Option(
            help="Tokens of the text skipped first (default: the 4096 `actsteer eval "
            "perplexity` scores).",
            min=0,
        ),
    ] = OFFSET,
    support: SupportOption = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            help="Stop bisecting when the λ within and over budget are this close (default: "
            "1/64 of the λ over budget).",
            metavar="Δλ",
        ),
    ] = None,
    cap: Annotated[
        float,
        typer.Option(help="Methods with unbounded λ (ActAdd, ITI-c): the largest λ tried."),
    ] = CAP,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the steering with the chosen default strength here."
        ),
    ] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Overwrite STEERING with the calibrated steering.")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the curve as JSON.", metavar="FILE")
    ] = None,
    force: ForceOption = False,
    modules_candidates: Annotated[
        str | None,
        typer.Option(
            "--modules-candidates",
            help="Instead of STEERING's modules: refit its method on each of these presets "
            "(or regexes), comma-separated, calibrate each, and keep the one with the largest "
            "held-out effect (the NLL gap of source vs target lines) at the same budget.",
            metavar="A,B,…",
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            help="--modules-candidates: the source texts (default: STEERING's source file).",
            metavar="FILE",
        ),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            help="--modules-candidates: the target texts (default: STEERING's target file).",
            metavar="FILE",
        ),
    ] = None,
    held_out_source: Annotated[
        Path | None,
        typer.Option(
            help="--modules-candidates, or a gated STEERING: held-out source texts for the "
            "effect (with --modules-candidates, default: the last quarter of the source texts, "
            "left out of the fits).",
            metavar="FILE",
        ),
    ] = None,
    held_out_target: Annotated[
        Path | None,
        typer.Option(help="--modules-candidates: held-out target texts.", metavar="FILE"),
    ] = None,
    thresholds: Annotated[
        str | None,
        typer.Option(
            help="A gated STEERING: the gate thresholds tried (log-odds, comma-separated; "
            "default -1,0,1,2); the one whose held-out effect is largest at its λ is kept. "
            "Needs --held-out-source and --held-out-target.",
            metavar="A,B,…",
        ),
    ] = None,
    open_shares: Annotated[
        str | None,
        typer.Option(
            help="A gated STEERING: instead of --thresholds, the shares of neutral WikiText "
            "tokens each module's gate is centred to leave open (comma-separated, e.g. "
            "0.05,0.1,0.2; docs/benchmarks.md, gate study G2).",
            metavar="A,B,…",
        ),
    ] = None,
    effect_prompts: Annotated[
        Path | None,
        typer.Option(
            help="A gated STEERING: choose the candidate whose sampled continuations of these "
            "validation prompts (one per line; never your evaluation prompts) are least toxic "
            "by the default judge, instead of by the held-out likelihood gap (needs the `eval` "
            "extra; docs/benchmarks.md, gate study G4).",
            metavar="FILE",
        ),
    ] = None,
    extrapolate: ExtrapolateOption = None,
) -> None:
    """Find the largest λ whose cost stays within a budget; store it as the default strength.

    Bisects the method's λ range (doubling first when it is unbounded) with a handful of
    forward passes over held-out text, never the evaluation prompts, and prints the curve of
    (λ, cost). Example: actsteer calibrate s.safetensors --budget-ppl 1 -o s.calibrated.safetensors
    """
    from actsteer.calibration import calibrate
    from actsteer.evaluation.common import jsonable
    from actsteer.models import model_for
    from actsteer.steering import Steering

    cost, budget = _budget(budget_ppl, budget_kl)
    if cost == "ppl" and prompts is not None:
        raise ActSteerError("--prompts goes with --budget-kl; --budget-ppl reads --data")
    if cost == "kl" and data is not None:
        raise ActSteerError("--data goes with --budget-ppl; --budget-kl reads --prompts FILE")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ActSteerError(f"--tolerance must be a number > 0, got {tolerance}")
    out = _output(steering_path, output, in_place)
    if json_out is not None and json_out.suffix.lower() != ".json":
        raise ActSteerError(f"--json should end in .json, got {json_out}")
    if out is not None and not in_place:
        check_output(out, force)
    if json_out is not None:
        check_output(json_out, force, "--json")
    steering = Steering.load(steering_path)
    if extrapolate is not None:
        steering = steering.extrapolated(extrapolate)
    texts = read_texts(prompts, "prompts") if prompts is not None else None
    gated = steering.gate_settings is not None
    if gated and (modules_candidates is not None or source or target):
        raise ActSteerError("a gated STEERING is calibrated as it is: drop --modules-candidates")
    if thresholds is not None and open_shares is not None:
        raise ActSteerError("give --thresholds or --open-shares, not both")
    if not gated and (thresholds is not None or open_shares is not None or effect_prompts):
        raise ActSteerError(
            "--thresholds, --open-shares and --effect-prompts calibrate a gated steering; "
            "STEERING has no gate"
        )
    held_out_given = held_out_source is not None or held_out_target is not None
    if gated and effect_prompts is not None and held_out_given:
        raise ActSteerError("give --effect-prompts or the held-out texts, not both")
    if gated and effect_prompts is None and (held_out_source is None or held_out_target is None):
        raise ActSteerError(
            "a gated STEERING needs an effect its threshold is chosen by: give "
            "--held-out-source and --held-out-target (texts the fit never saw), or "
            "--effect-prompts FILE (validation prompts)"
        )
    candidates = _candidates(
        modules_candidates, source, target,
        None if gated else held_out_source, None if gated else held_out_target,
    )  # fmt: skip
    model = model_for(steering, model)
    lm, tok = load_lm(model, device, dtype)
    status(
        f"Calibrating {steering_path} on {model}: largest λ with "
        f"{'ΔPPL' if cost == 'ppl' else 'KL'} ≤ {budget:g} …"
    )
    options: dict[str, Any] = dict(
        cost=cost, data=data, passages=passages, passage_tokens=passage_tokens, offset=offset,
        prompts=texts, support=support, tolerance=tolerance, cap=cap,
        on_point=lambda lam, value: status(f"  λ = {lam:.4g}: {value:+.4f}"),
    )  # fmt: skip
    chosen = None
    if gated:
        held = None
        if held_out_source is not None and held_out_target is not None:
            held = (held_out_source, held_out_target)
        found = _calibrate_gate(
            steering, lm, tok, budget, held, effect_prompts, thresholds, open_shares, options
        )
        result = found.best.calibration
        at = (
            f"neutral open share {found.best.open_share:g}"
            if found.best.open_share is not None
            else f"threshold {found.best.threshold:g}"
        )
        title = f"{result.label} of {steering_path} at {at}"
    elif candidates is None:
        result = calibrate(steering, lm, tok, budget, **options)
        title = f"{result.label} of {steering_path} on {model}"
    else:
        chosen = _calibrate_candidates(steering, lm, tok, budget, candidates, options)
        result = chosen.best.calibration
        title = f"{result.label} of the best candidate, {chosen.best.modules}, on {model}"
    console().print(curve_table(result, title))
    why = {
        "tolerance": f"λ = {result.rejected or 0:.4g} is over it",
        "range": "the top of the method's range",
        "cap": "--cap",
        "zero budget": "a zero budget allows no change: nothing was evaluated",
    }[result.stopped_by]
    typer.echo(
        f"Chosen λ = {result.strength:.4g} ({result.label} {result.cost:+.4f} ≤ {budget:g}; "
        f"{why}): {result.evaluations} evaluations, {result.forward_passes} forward passes, "
        f"{result.seconds:.1f} s"
    )
    if json_out is not None:
        content: dict[str, Any] = {"format": "actsteer-calibration/1"}
        content.update(steering=str(steering_path), model=model, **result.to_json())
        if chosen is not None:
            content["modules_candidates"] = _candidates_json(chosen)
        with written_file(json_out) as scratch:
            scratch.write_text(json.dumps(jsonable(content), indent=1), encoding="utf-8")
        typer.echo(f"Wrote the curve to {json_out}")
    if out is None:
        typer.echo("Not saved: pass -o OUT.safetensors, or --in-place to update STEERING.")
        return
    path = result.steering.save(out)  # atomic: written beside, then renamed over
    typer.echo(f"Saved {path} (default strength λ = {result.strength:.4g})")
