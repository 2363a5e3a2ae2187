"""Commands on a steering file: inspect (describe, plot) and export (a folded checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from actsteer.choices import check_choice
from actsteer.cli.core import (
    FILES_PANEL,
    app,
    console,
    load_lm,
    read_texts,
    selected,
    status,
)
from actsteer.cli.options import (
    DeviceOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    MaxLengthOption,
    ModelOption,
    SelectOption,
    StrengthOption,
    SupportOption,
)
from actsteer.errors import ActSteerError
from actsteer.outputs import check_output, written_file

if TYPE_CHECKING:
    from actsteer.steering import Steering


@app.command(rich_help_panel=FILES_PANEL)
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="A steering file (.safetensors), a save_pretrained folder or hf:USER/REPO."
        ),
    ],
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw a PNG: ω and β per module (median, 5–95% band); with --data, "
            "histograms of one module's most-moved units.",
            metavar="PNG",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Source texts (.txt, .jsonl, .csv or hf:ID): per module, the share of their "
            "token activations inside the support and, with --target, how well source and "
            "target separate; with --plot, histograms before and after transport (λ = 1).",
            metavar="FILE",
        ),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            "--target",
            help="With --data: target texts, for the per-module separation (default: the "
            "steering's recorded target file, when it exists).",
            metavar="FILE",
        ),
    ] = None,
    field: FieldOption = None,
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    module: Annotated[
        str | None,
        typer.Option(help="For --data: the module to show (default: the middle one)."),
    ] = None,
    support: SupportOption = None,
    max_length: MaxLengthOption = 64,
    force: ForceOption = False,
) -> None:
    """Describe a steering file: method, model, data and per-module map statistics.

    With --data, which layers matter: per module, how well --data (source) and --target texts
    separate (mean over units of |2·AUROC − 1|) and the share of --data's token activations
    inside the support. With --plot, also a figure of what it does at a glance (--model,
    --module, --support and --max-length apply to --data).
    """
    from actsteer.models import model_for
    from actsteer.steering import Steering

    if data is None and (target is not None or field is not None):
        raise ActSteerError("--target and --field go with --data FILE")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ActSteerError(f"--plot should end in .png, got {plot}")
    steering = Steering.load(path)
    if module is not None and module not in steering.maps:
        raise ActSteerError(
            f"--module {module!r} is not steered by {path}; it steers {len(steering.maps)} "
            f"modules, e.g. {next(iter(steering.maps), '-')}"
        )
    if plot is not None:
        check_output(plot, force, "--plot")
    info = steering.info
    out = console()
    out.print(f"[bold]{path}[/bold]")
    rows = [
        ("method", steering.method + (" (inverted)" if info.inverted else "")),
        ("mode", info.mode),
        ("model", info.model_name or "?"),
        ("pooling", info.pooling or "?"),
        ("support", steering.default_support),
        ("default strength", f"{info.default_strength:g}"),
        ("data", ", ".join(f"{k}={v}" for k, v in info.data.items()) or "-"),
        ("modules", str(len(steering.maps))),
    ]
    gating = steering.gate_settings
    if gating is not None:
        rows.append(
            ("gate", f"{gating.kind}, threshold {gating.threshold:g}, temperature {gating.tau:g}")
        )
    for key, value in rows:
        out.print(Text(f"{key:>16}: {value}"))
    kinds = sorted({amap.kind for amap in steering.maps.values()})
    summaries = {
        "affine": "maps T(a) = ω ⊙ a + β per module",
        "quantile": "quantile maps per module: ω, β of the least-squares line through the knots",
        "joint": "joint maps T(a) = M a + c per module: ω = M's diagonal, β = c",
    }
    title = "; ".join(summaries[kind] for kind in kinds)
    table = Table(title=title, show_edge=False)
    table.add_column("module", overflow="fold")
    for name in ("D", "ω mean", "ω min", "ω max", "β mean", "max |β|"):
        table.add_column(name, justify="right")
    for name, amap in steering.maps.items():
        omega, beta = (t.float() for t in amap.line())
        table.add_row(
            name,
            str(amap.dim),
            *(f"{v:.3f}" for v in (omega.mean(), omega.min(), omega.max())),
            *(f"{v:.3f}" for v in (beta.mean(), beta.abs().max())),
        )
    out.print(table)
    if steering.gates:
        gates = Table(title="gates s(a) = w · a + b per module", show_edge=False)
        gates.add_column("module", overflow="fold")
        for name in ("‖w‖", "max |w|", "unit of max |w|", "b"):
            gates.add_column(name, justify="right")
        for name, gate in steering.gates.items():
            w = gate.weight.float()
            gates.add_row(
                name, f"{w.norm():.3f}", f"{w.abs().max():.3f}", str(int(w.abs().argmax())),
                f"{float(gate.bias):.3f}",
            )  # fmt: skip
        out.print(gates)
    lm = tok = texts = None
    if data is not None:
        texts = read_texts(data, "--data", field)
        lm, tok = load_lm(model_for(steering, model), device, dtype)
        _separation_table(steering, lm, tok, texts, target, field, support, max_length)
    if plot is not None:
        _inspect_plot(steering, path, plot, lm, tok, texts, module, support, max_length)


def _separation_table(
    steering: Steering,
    lm: Any,
    tok: Any,
    source: list[str],
    target: Path | None,
    field: str | None,
    support: str | None,
    max_length: int,
) -> None:
    """Print `inspect --data`'s per-module table: separation and support coverage."""
    from actsteer.diagnostics import module_reports

    recorded = steering.info.data.get("target_file")
    # only a path that says where it is: a relative one was relative to where fit ran
    if target is None and recorded is not None and Path(str(recorded)).is_absolute():
        if Path(str(recorded)).is_file():
            target = Path(str(recorded))
    elif target is None and recorded is not None:
        status(
            f"note: the steering's target file {recorded!r} was recorded relative to where it "
            "was fitted; pass --target FILE for the separation column"
        )
    target_texts = read_texts(target, "--target", field) if target is not None else None
    support = support or steering.default_support
    status(f"Recording {len(source)} --data text(s) at {len(steering.maps)} modules …")
    reports = module_reports(
        lm, tok, steering, source, target_texts, support=support, max_length=max_length
    )
    title = f"per module on {len(source)} --data texts" + (
        f" vs {len(target_texts)} from {target}" if target_texts else " (no --target)"
    )
    table = Table(title=title, show_edge=False)
    table.add_column("module", overflow="fold")
    if target_texts:
        table.add_column("separation |2·AUROC−1|", justify="right")
        table.add_column("strongest unit", justify="right")
    table.add_column(f"tokens inside {support}", justify="right")
    for report in reports:
        cells = [] if not target_texts else [f"{report.separation:.3f}", f"{report.strongest:.3f}"]
        table.add_row(report.module, *cells, f"{100 * report.inside:.1f}%")
    console().print(table)


def _inspect_plot(
    steering: Steering,
    path: Path,
    plot: Path,
    lm: Any,
    tok: Any,
    texts: list[str] | None,
    module: str | None,
    support: str | None,
    max_length: int,
) -> None:
    """Draw `inspect --plot`: record the --data texts at one module when given, then save."""
    from actsteer.capture import record
    from actsteer.evaluation.inspect_plot import middle_module, steering_figure

    source = None
    module = module or middle_module(steering)
    if texts is not None:
        status(f"Recording {len(texts)} text(s) at {module} …")
        source = record(
            lm, tok, texts, [module], pooling="all", max_length=max_length, progress=False
        )[module]
    figure = steering_figure(
        steering, source, module, support=support, title=f"{path.name}: {steering.method}, "
        f"{len(steering.maps)} steered modules",
    )  # fmt: skip
    with written_file(plot) as scratch:
        figure.savefig(scratch, dpi=100, bbox_inches="tight")
    typer.echo(f"Saved the figure to {plot}")


@app.command(rich_help_panel=FILES_PANEL)
def export(
    steering_path: Annotated[
        Path,
        typer.Option("--steering", help="A steering file from `actsteer fit` (or hf:USER/REPO)."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Folder for the steered checkpoint (--format gguf: a file)."
        ),
    ],
    strength: StrengthOption = None,
    support: SupportOption = "all",
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    modules: SelectOption = None,
    force: ForceOption = False,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="checkpoint: the steering folded into the weights; gguf: a llama.cpp control "
            "vector (additive steerings of the residual stream: mean-act, actadd, iti-c).",
            metavar="checkpoint|gguf",
        ),
    ] = "checkpoint",
) -> None:
    """Fold a steering into the weights at one λ and save a checkpoint stock transformers loads,
    or write it as a llama.cpp control vector.

    The checkpoint runs at the plain model's speed with no actsteer import:
    AutoModelForCausalLM.from_pretrained(OUTPUT). Serving engines that read transformers
    checkpoints can serve it. The control vector (--format gguf) holds λ·β of each steered
    decoder block k as direction.k: `llama-cli --control-vector OUTPUT`.
    """
    check_choice(export_format, ("checkpoint", "gguf"), "--format")
    import torch

    from actsteer.export import export as export_checkpoint
    from actsteer.models import model_for
    from actsteer.steering import Steering
    from actsteer.strengths import parse_strength_specs, resolve_strengths

    steering = selected(Steering.load(steering_path), modules)
    strengths = resolve_strengths(steering, parse_strength_specs(strength) if strength else None)
    if len(strengths) != 1:
        raise ActSteerError(
            "export folds one fixed strength: give one λ with --strength, got "
            f"{len(strengths)} ({', '.join(f'{s:g}' for s in strengths)})"
        )
    lam = strengths[0]
    check_output(output, force)
    model = model_for(steering, model)
    lm, tok = load_lm(model, device, dtype)
    if export_format == "gguf":
        from actsteer.export import export_control_vector

        export_control_vector(steering, lm, output, lam, support or "all", force=force)
        blocks = ", ".join(f"direction.{b}" for b in _blocks_of(steering, lm))
        typer.echo(f"Saved the control vector (λ = {lam:g}) to {output}: {blocks}")
        return
    probe = tok(["The weather today is"], return_tensors="pt")
    with torch.inference_mode(), steering.applied(lm, lam, support):
        hooked = lm(**probe).logits
    export_checkpoint(steering, lm, tok, output, lam, support, force=force)
    with torch.inference_mode():
        folded = lm(**probe).logits
    typer.echo(f"Saved the steered checkpoint (λ = {lam:g}, support {support}) to {output}")
    gap = (folded - hooked).abs().max().item()
    typer.echo(f"  folded vs hooked logits on a probe prompt: max |Δ| = {gap:.2e}")
    if support != steering.default_support:
        typer.echo(
            f"  note: folded with support {support}; generate and eval apply this steering "
            f"with {steering.default_support} by default, so the two differ (give them "
            f"--support {support} to see this checkpoint's model)"
        )


def _blocks_of(steering: Steering, model: Any) -> list[int]:
    """The decoder block numbers a control vector of the steering holds (block 0 left out)."""
    from actsteer.gguf_vectors import decoder_blocks

    index = {name: i for i, name in enumerate(decoder_blocks(model))}
    return [index[name] for name in steering.maps if index[name] > 0]
