"""The generate command: prompts × strengths in one batched call, as a table or as JSON; the
grid table and the --steering FILE[:λ] grammar the demo shares."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from actsteer.choices import POSITIONS, check_choice
from actsteer.cli.core import (
    LM_PANEL,
    app,
    console,
    is_number,
    load_lm,
    read_texts,
    selected,
    status,
)
from actsteer.cli.options import (
    ChatOption,
    DeviceOption,
    DtypeOption,
    ExtrapolateOption,
    FieldOption,
    MaxNewTokensOption,
    ModelOption,
    SelectOption,
    StrengthOption,
    SupportOption,
)
from actsteer.errors import ActSteerError
from actsteer.outputs import check_output

if TYPE_CHECKING:
    from actsteer.steering import Steering


def format_strength(strength: float) -> str:
    return f"λ = {strength:g}"


def grid_table(
    prompts: Sequence[str], columns: Sequence[str], texts: Sequence[Sequence[str]], title: str
) -> Table:
    """Rows = prompts, one column per strength; texts are shown literally (no rich markup)."""
    table = Table(title=title, show_lines=True, expand=True)
    width = min(30, max(len(p) for p in prompts))
    table.add_column("prompt", style="bold", ratio=1, min_width=width)
    for column in columns:
        table.add_column(column, ratio=2)
    for prompt, row in zip(prompts, texts, strict=True):
        table.add_row(Text(prompt), *(Text(t.strip()) for t in row))
    return table


def _generate_kwargs(
    max_new_tokens: int, sample: bool, temperature: float, top_p: float, repetition_penalty: float
) -> dict[str, Any]:
    if repetition_penalty <= 0:
        raise ActSteerError(f"--repetition-penalty must be > 0, got {repetition_penalty}")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    if sample:
        if temperature <= 0:
            raise ActSteerError(f"--temperature must be > 0 when sampling, got {temperature}")
        kwargs.update(temperature=temperature, top_p=top_p)
    return kwargs


def parse_steerings(
    specs: Sequence[str], extrapolate: float | None = None, modules: str | None = None
) -> tuple[list[tuple[str, Steering, float]], tuple[str, Steering] | None]:
    """Split `--steering FILE[:λ]` values into fixed (file, steering, λ) and the swept one
    (each accepting λ up to `extrapolate` when given, and narrowed to `modules`)."""
    from actsteer.steering import Steering

    def load(path: str) -> Steering:
        steering = selected(Steering.load(path), modules)
        return steering if extrapolate is None else steering.extrapolated(extrapolate)

    fixed: list[tuple[str, Steering, float]] = []
    swept: tuple[str, Steering] | None = None
    for spec in specs:
        path, _, lam = spec.rpartition(":")
        if path and not is_number(lam) and Path(path).exists() and not Path(spec).exists():
            raise ActSteerError(
                f"--steering {spec!r}: a fixed strength goes after ':' as a number "
                f"(FILE:λ, e.g. {path}:0.5), got {lam!r}"
            )
        if path and is_number(lam):
            steering = load(path)
            steering.check_strength(float(lam))
            fixed.append((path, steering, float(lam)))
        elif swept is not None:
            raise ActSteerError(
                f"only one --steering can be swept over --strength; give {spec} a fixed "
                f"strength as {spec}:λ"
            )
        else:
            swept = (spec, load(spec))
    return fixed, swept


@app.command(rich_help_panel=LM_PANEL)
def generate(
    prompts: Annotated[
        list[str] | None,
        typer.Argument(
            help="One or more prompts (or --prompts FILE). Put `--` before the prompts if one "
            "starts with - or looks like a number right after --strength.",
            metavar="PROMPT",
        ),
    ] = None,
    steering_specs: Annotated[
        list[str] | None,
        typer.Option(
            "--steering",
            help="A steering file from `actsteer fit` (or hf:USER/REPO); omit for plain. Repeat "
            "to compose: FILE:λ applies FILE at a fixed λ (in the given order) before the one "
            "FILE without a λ, which is swept over --strength.",
            metavar="FILE[:λ]",
        ),
    ] = None,
    strength: StrengthOption = None,
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    modules: SelectOption = None,
    support: SupportOption = None,
    positions: Annotated[
        str,
        typer.Option(help="Token positions steered.", metavar="|".join(POSITIONS)),
    ] = "all",
    max_new_tokens: MaxNewTokensOption = 40,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample (seeded) or decode greedily.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    repetition_penalty: Annotated[
        float, typer.Option(help="Penalty > 1 discourages repeating tokens (1 = off).")
    ] = 1.3,
    extrapolate: ExtrapolateOption = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="Prompts from a file, after any given as arguments: .txt (one per line), "
            ".jsonl, .csv (see --field) or hf:ID[:CONFIG[:SPLIT]].",
            metavar="FILE",
        ),
    ] = None,
    field: FieldOption = None,
    chat: ChatOption = False,
    show_gate: Annotated[
        bool,
        typer.Option(
            "--show-gate",
            help="A gated steering: print each generated token coloured by the gate it was "
            "chosen under (its strength is λ × gate).",
        ),
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="With or without --show-gate: also write that view as a page."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the results as one JSON object (model, steerings, decoding settings, "
            "each prompt's text per strength) instead of a table.",
        ),
    ] = False,
) -> None:
    """Generate from PROMPTs at several strengths in ONE batched call; print a table (or JSON).

    Rows are prompts, columns strengths λ (of the one --steering FILE without ':λ'). Example:
    actsteer generate --steering s.safetensors --strength 0 0.5 1 -- "I went to the park and"
    """
    from actsteer.generation import generate_grid
    from actsteer.models import model_for
    from actsteer.strengths import parse_strength_specs, resolve_strengths

    kwargs = _generate_kwargs(max_new_tokens, sample, temperature, top_p, repetition_penalty)
    check_choice(positions, POSITIONS, "--positions")
    if as_json and (show_gate or html is not None):
        raise ActSteerError("--json prints the texts; leave out --show-gate and --html")
    prompts = list(prompts or [])
    if prompts_file is not None:
        prompts += read_texts(prompts_file, "--prompts", field)
    elif field is not None:
        raise ActSteerError("--field goes with --prompts FILE")
    if not prompts:
        raise ActSteerError("give prompts as arguments or with --prompts FILE")
    if modules is not None and not steering_specs:
        raise ActSteerError("--modules narrows a --steering FILE; give one")
    fixed, swept = parse_steerings(steering_specs or [], extrapolate, modules)
    steering = swept[1] if swept else None
    strengths = resolve_strengths(
        steering,
        parse_strength_specs(strength) if strength else None,
        support=support,
        needs="a --steering FILE without ':λ'",
    )
    if steering is not None:
        columns = [format_strength(s) for s in strengths]
    elif fixed:
        columns = ["composed: " + ", ".join(f"{p}:{lam:g}" for p, _, lam in fixed)]
    else:
        columns = ["plain"]
    model = model_for(fixed[0][1] if fixed else steering, model)
    lm, tok = load_lm(model, device, dtype)
    status(
        f"Generating {len(prompts)} prompt(s) × {len(columns)} strength(s) in one batched call …"
    )
    if sample:
        import torch

        torch.manual_seed(seed)
    if show_gate or html is not None:
        from actsteer.cli.gates import show_gates

        if steering is None or steering.gate_settings is None or fixed or chat:
            raise ActSteerError(
                "--show-gate and --html show one gated --steering FILE (fit with --gate), "
                "without fixed steerings or --chat"
            )
        if html is not None:
            check_output(html, False, "--html")
        show_gates(lm, tok, prompts, steering, strengths, html, f"{model}: gates", **kwargs)
        return
    texts = generate_grid(
        lm,
        tok,
        prompts,
        strengths,
        steering,
        support,
        positions,
        fixed=[(st, lam) for _, st, lam in fixed],
        chat=chat,
        progress=True,
        **kwargs,
    )
    names = [p for p, *_ in fixed] + ([swept[0]] if swept else [])
    if as_json:
        results = {
            "model": model,
            "steerings": [{"file": p, "strength": lam} for p, _, lam in fixed]
            + ([{"file": swept[0], "strength": "swept"}] if swept else []),
            "modules": modules,
            "strengths": list(strengths) if steering is not None else None,
            "decoding": {**kwargs, **({"seed": seed} if sample else {})},
            "results": [
                {"prompt": prompt, "texts": [text.strip() for text in row]}
                for prompt, row in zip(prompts, texts, strict=True)
            ],
        }
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    title = f"{model}" + (f" steered by {' then '.join(names)}" if names else "")
    table = grid_table(prompts, columns, texts, title)
    table.caption = decoding_caption(kwargs)
    console().print(table)


def decoding_caption(kwargs: dict[str, Any]) -> str:
    """How the table's texts were decoded, the repetition penalty included (model.generate
    and `actsteer serve` use none, so their text differs unless --repetition-penalty 1)."""
    penalty = kwargs.get("repetition_penalty", 1.0)
    how = (
        f"sampled (temperature {kwargs['temperature']:g}, top-p {kwargs['top_p']:g})"
        if kwargs["do_sample"]
        else "greedy"
    )
    note = (
        f"repetition penalty {penalty:g} (model.generate and actsteer serve use 1: "
        "--repetition-penalty 1 to match them)"
        if penalty != 1.0
        else "no repetition penalty"
    )
    return f"{how}, {note}, {kwargs['max_new_tokens']} new tokens"
