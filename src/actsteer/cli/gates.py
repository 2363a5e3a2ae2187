"""Commands about gates: monitor (the gate as a detector), and what generate --show-gate and
--html show (each generated token coloured by the gate it was chosen under)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from actsteer.cli.core import EVAL_PANEL, app, console, load_lm, read_texts, status
from actsteer.cli.options import (
    DeviceOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    MaxLengthOption,
    ModelOption,
)
from actsteer.errors import ActSteerError
from actsteer.outputs import check_output, written_file

if TYPE_CHECKING:
    from actsteer.steering import Steering


def show_gates(
    lm: Any,
    tok: Any,
    prompts: list[str],
    steering: Steering,
    strengths: list[float],
    html_path: Path | None,
    title: str,
    **generate_kwargs: Any,
) -> None:
    """generate --show-gate / --html: each prompt's continuation at each λ, every token
    coloured by its gate, in the terminal and (with html_path) as a page."""
    from actsteer.gate_view import render_html, render_text, trace_gates

    traces = []
    for lam in strengths:
        status(f"Generating with the gate traced at λ = {lam:g} …")
        found = trace_gates(lm, tok, prompts, steering, lam, **generate_kwargs)
        for trace in found:
            trace.prompt = f"[λ = {lam:g}] {trace.prompt}"
        traces += found
    console().print(render_text(traces))
    if html_path is not None:
        with written_file(html_path) as scratch:
            scratch.write_text(render_html(traces, title), encoding="utf-8")
        typer.echo(f"Wrote {html_path}")


@app.command(rich_help_panel=EVAL_PANEL)
def monitor(
    texts: Annotated[
        Path,
        typer.Argument(
            help="Texts to score (.txt, .jsonl, .csv or hf:ID): the positives with --against.",
            metavar="TEXTS",
        ),
    ],
    steering_path: Annotated[
        Path, typer.Option("--steering", help="A gated steering (or hf:USER/REPO).")
    ],
    against: Annotated[
        Path | None,
        typer.Option(
            help="Texts without the property (the negatives): report the gate's AUROC as a "
            "detector of TEXTS against them.",
            metavar="FILE",
        ),
    ] = None,
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    field: FieldOption = None,
    max_length: MaxLengthOption = 128,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also write every text's score as JSON."),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Score texts by a steering's gate alone: how source-like each is (0 to 1).

    Per text, the gate's score averaged over its tokens and the steered modules, through the
    gate's threshold and temperature. With --against, the AUROC of those scores as a detector
    of TEXTS (positives) against the --against texts (negatives).
    """
    import json

    from actsteer.gate_view import score_texts
    from actsteer.models import model_for
    from actsteer.steering import Steering

    steering = Steering.load(steering_path)
    if steering.gate_settings is None:
        raise ActSteerError(f"{steering_path} has no gate; fit one with `actsteer fit --gate`")
    if out is not None:
        check_output(out, force)
    positives = read_texts(texts, "texts", field)
    negatives = read_texts(against, "--against", field) if against is not None else []
    lm, tok = load_lm(model_for(steering, model), device, dtype)
    status(f"Scoring {len(positives) + len(negatives)} text(s) by the gate …")
    scores = score_texts(lm, tok, steering, positives + negatives, max_length=max_length)
    table = Table(title=f"gate scores ({steering_path})", show_edge=False)
    table.add_column("score", justify="right")
    table.add_column("text", overflow="fold")
    for text, score in list(zip(positives, scores, strict=False))[:20]:
        table.add_row(f"{score:.3f}", text[:120])
    console().print(table)
    result: dict[str, Any] = {"texts": str(texts), "scores": scores[: len(positives)]}
    if negatives:
        import torch

        from actsteer.methods.aura import unit_auroc

        pos = torch.tensor(scores[: len(positives)]).unsqueeze(1)
        neg = torch.tensor(scores[len(positives) :]).unsqueeze(1)
        auroc = float(unit_auroc(pos, neg)[0])
        result.update(against=str(against), against_scores=scores[len(positives) :], auroc=auroc)
        typer.echo(f"AUROC of the gate as a detector of {texts} against {against}: {auroc:.3f}")
    if out is not None:
        with written_file(out) as scratch:
            scratch.write_text(json.dumps(result, indent=1), encoding="utf-8")
        typer.echo(f"Wrote {out}")
