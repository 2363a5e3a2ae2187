"""Language-model commands: fit, demo, methods (generate is in `generate`)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from actsteer.choices import DEFAULT_MODULES, GATE_KINDS, POOLINGS, check_choice
from actsteer.cli.core import (
    LM_PANEL,
    app,
    console,
    load_lm,
    read_texts,
    renamed_steps,
    status,
)
from actsteer.cli.options import (
    ChatOption,
    DenoisingStepsOption,
    DeviceOption,
    DtypeOption,
    FieldOption,
    ForceOption,
    GuidanceScaleOption,
    MaxLengthOption,
    MaxNewTokensOption,
    ModelOption,
    OldStepsOption,
    SizeOption,
    SupportOption,
)
from actsteer.errors import ActSteerError
from actsteer.families import presets_help
from actsteer.methods import METHODS, get_method
from actsteer.outputs import check_output
from actsteer.texts import package_texts

if TYPE_CHECKING:
    from actsteer.methods import Method
    from actsteer.modes import FitMode

DEMO_PROMPTS = (
    "I went to the park and",
    "My favourite thing about Sundays is",
    "Yesterday the news said that",
)
DEMO_STRENGTHS = (0.0, 0.5, 1.0)


def _recorded(path: Path) -> str:
    """A text file as a steering records it: absolute (an hf: dataset as given), so a later
    command reads that file wherever it runs."""
    return str(path) if str(path).startswith("hf:") else str(path.resolve())


def option_names(keywords: dict[str, Any]) -> str:
    """Keywords as the options that gave them: {"training_steps": 5} → "--training-steps"."""
    return ", ".join(f"--{key.replace('_', '-')}" for key in keywords)


#: The modes a language model is fitted in (actsteer.modes), for --mode.
LM_MODES = ("independent", "sequential", "end-to-end")


def lm_mode(
    estimator: Method,
    mode: str | None,
    training: dict[str, Any],
    support_pooling: str | None,
) -> FitMode:
    """The fit's mode settings from --mode and the options that belong to one mode (an option
    of another mode is refused, saying which mode it belongs to)."""
    from actsteer import modes

    name = mode or estimator.modes[0]
    if training and name != "end-to-end":
        raise ActSteerError(
            f"{option_names(training)} only apply to methods trained end to end (--method "
            f"lineas); method {estimator.name!r} is estimated in closed form"
        )
    if support_pooling is not None and name != "independent":
        raise ActSteerError(
            f"--support-pooling applies to independent fits, not mode {name!r}: drop it"
        )
    if name == "end-to-end":
        return modes.EndToEnd(**training)
    if name == "independent":
        return modes.Independent(support_pooling=support_pooling)
    return modes.resolve_mode(name)


@app.command(rich_help_panel=LM_PANEL)
def fit(
    source: Annotated[
        Path,
        typer.Option(
            "--source",
            help="What to move away from: a .txt (one text per line), .jsonl or .csv file "
            "(see --field) or hf:ID[:CONFIG[:SPLIT]].",
            metavar="FILE",
        ),
    ],
    target: Annotated[
        Path,
        typer.Option("--target", help="What to move toward, in the same formats.", metavar="FILE"),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write the steering (.safetensors)."),
    ],
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    modules: Annotated[
        str | None,
        typer.Option(
            help=f"A preset of the model's family (default for language models {DEFAULT_MODULES}; "
            f"{presets_help()}) or a regex fully matching module names.",
            metavar="PRESET|REGEX",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="Estimator; see `actsteer methods`.", metavar="NAME")
    ] = "linear-act",
    mode: Annotated[
        str | None,
        typer.Option(
            help="independent: each module fitted on the plain model; sequential: on activations "
            "already moved by upstream maps; end-to-end: all maps trained jointly (lineas). "
            "Default: the method's first (`actsteer methods`).",
            metavar="|".join(LM_MODES),
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            help="How token activations become one sample per text. Default: the method's "
            "(mean for the AcT methods).",
            metavar="|".join(POOLINGS),
        ),
    ] = None,
    support: SupportOption = None,
    support_pooling: Annotated[
        str | None,
        typer.Option(
            help="Estimate the support's bounds from source samples pooled this way (default: "
            "--pooling); `all`: from token activations, so the support covers the tokens the "
            "map is applied to. Independent mode.",
            metavar="|".join(POOLINGS),
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.", min=1)] = 16,
    max_length: MaxLengthOption = 128,
    pipeline: Annotated[
        str | None,
        typer.Option(
            help="A diffusers text-to-image pipeline (folder or hub id) to steer instead of a "
            "language model; presets unet-norms, dit-blocks, text-encoder.",
            metavar="DIR",
        ),
    ] = None,
    denoising_steps: DenoisingStepsOption = None,
    guidance_scale: GuidanceScaleOption = 5.0,
    size: SizeOption = None,
    training_steps: Annotated[
        int | None,
        typer.Option(help="End-to-end (lineas): training steps (default 100).", min=1),
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option(
            help="End-to-end (lineas): Adam's learning rate (default 0.02).", metavar="LR"
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(
            help="End-to-end (lineas): sparse-group-lasso strength (default 1, chosen on "
            "held-out texts); 0 = no penalty, larger leaves more units exactly untouched.",
            metavar="S",
        ),
    ] = None,
    steps: OldStepsOption = None,
    gate: Annotated[
        str | None,
        typer.Option(
            help="Also fit a gate per module (token: each token's own score; context: the "
            "running mean over the text so far; prompt: the prompt's, held), so each token's "
            "strength is λ·g; calibrate it with --held-out-source/--held-out-target.",
            metavar="token|context|prompt",
        ),
    ] = None,
    force: ForceOption = False,
    field: FieldOption = None,
    chat: ChatOption = False,
) -> None:
    """Fit a steering that moves the model's activations on SOURCE texts onto TARGET's."""
    from actsteer import modes
    from actsteer.diffusion import load_pipeline
    from actsteer.fitting import fit as fit_steering
    from actsteer.models import model_for

    estimator = get_method(method)
    check_choice(mode, LM_MODES, "--mode")
    check_choice(pooling, POOLINGS, "--pooling")
    check_choice(support_pooling, POOLINGS, "--support-pooling")
    check_choice(gate, GATE_KINDS, "--gate")
    if output.suffix != ".safetensors":
        raise ActSteerError(f"--output should end in .safetensors, got {output}")
    check_output(output, force)  # before fitting: a refused or failed fit leaves it untouched
    if pipeline is not None:
        denoising_steps = renamed_steps(steps, denoising_steps, "--denoising-steps")
    else:
        training_steps = renamed_steps(steps, training_steps, "--training-steps")
    source_texts = read_texts(source, "source", field)
    target_texts = read_texts(target, "target", field)
    if chat and pipeline is not None:
        raise ActSteerError("--chat is for language models (a pipeline has no chat template)")
    data = {"source_file": _recorded(source), "target_file": _recorded(target)}
    training = {
        key: value
        for key, value in (
            ("training_steps", training_steps), ("learning_rate", learning_rate),
            ("sparsity", sparsity),
        )
        if value is not None
    }  # fmt: skip
    if pipeline is not None:
        status(f"Loading pipeline {pipeline} …")
        pipe = load_pipeline(pipeline, device=device, dtype=dtype)
        status(f"Fitting {method} on {pipeline}: {len(source_texts)} → {len(target_texts)} prompts")
        given = {**training, **({"gate": gate} if gate is not None else {})}
        if given:
            raise ActSteerError(f"{option_names(given)} apply to language models, not pipelines")
        options = {} if size is None else {"height": size, "width": size}
        denoising = modes.Denoising(
            denoising_steps=denoising_steps or 20, guidance_scale=guidance_scale, options=options
        )
        steering = fit_steering(
            pipe, source=source_texts, target=target_texts, modules=modules, method=method,
            mode=denoising, support=support, data=data,
        )  # fmt: skip
        typer.echo(f"Saved steering to {steering.save(output)} ({len(steering.maps)} modules)")
        return
    settings = lm_mode(estimator, mode, training, support_pooling)
    model = model_for(None, model)
    lm, tok = load_lm(model, device, dtype)
    status(
        f"Fitting {method} ({settings.name}) on {model}: {len(source_texts)} source → "
        f"{len(target_texts)} target texts, modules {modules or DEFAULT_MODULES!r} …"
    )
    start = time.perf_counter()
    steering = fit_steering(
        lm,
        tok,
        source=source_texts,
        target=target_texts,
        modules=modules,
        method=method,
        mode=settings,
        pooling=pooling,
        support=support,
        batch_size=batch_size,
        max_length=max_length,
        data=data,
        chat=chat,
        gate=gate,
    )
    elapsed = time.perf_counter() - start
    path = steering.save(output)
    widths = sorted({amap.dim for amap in steering.maps.values()})
    typer.echo(f"Saved steering to {path}")
    typer.echo(
        f"  {steering.method}, {steering.info.mode}, pooling {steering.info.pooling}, "
        f"support {steering.default_support}; {len(steering.maps)} modules "
        f"({', '.join(map(str, widths))} units); fitted in {elapsed:.1f} s"
    )


@app.command(rich_help_panel=LM_PANEL)
def demo(
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    max_new_tokens: MaxNewTokensOption = 40,
) -> None:
    """Induce the concept "football": fit neutral → football sentences, generate at λ = 0, ½, 1.

    Uses the package's own sentence files, Linear-AcT on all layer norms with support "all",
    then one batched greedy generation (repetition penalty 1.3) for three neutral prompts; saves
    the steering in actsteer's cache folder and prints the commands to try next.
    """
    from actsteer.cache import cache_dir
    from actsteer.cli.generate import format_strength, grid_table
    from actsteer.fitting import fit as fit_steering
    from actsteer.generation import generate_grid
    from actsteer.models import model_for

    model = model_for(None, model)
    source, target = package_texts("neutral"), package_texts("football")
    lm, tok = load_lm(model, device, dtype)
    status(
        f"Fitting a 'football' steering on {model}: Linear-AcT on every layer norm, "
        f"{len(source)} neutral → {len(target)} football sentences …"
    )
    start = time.perf_counter()
    steering = fit_steering(
        lm,
        tok,
        source=source,
        target=target,
        modules="layernorms",
        method="linear-act",
        mode="independent",
        support="all",
        data={
            "source_file": "actsteer/data/neutral.txt",
            "target_file": "actsteer/data/football.txt",
        },
    )
    status(f"Fitted {len(steering.maps)} modules in {time.perf_counter() - start:.1f} s.")
    status(
        f"Generating {len(DEMO_PROMPTS)} prompts × λ = 0, 0.5, 1 in one batched call "
        f"({max_new_tokens} new tokens, greedy) …"
    )
    texts = generate_grid(
        lm,
        tok,
        DEMO_PROMPTS,
        DEMO_STRENGTHS,
        steering,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=1.3,
        progress=True,
    )
    columns = [format_strength(s) for s in DEMO_STRENGTHS]
    title = f"{model}: λ = 0 is the untouched model, λ = 1 talks football"
    console().print(grid_table(DEMO_PROMPTS, columns, texts, title))
    folder = cache_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    path = steering.save(folder / "football.safetensors")
    typer.echo(next_steps(path))


def next_steps(path: Path) -> str:
    """Where the demo's steering is, and what to try with it next."""
    quoted = shlex.quote(str(path))
    return (
        f"\nThe steering is saved at {path}. Next:\n"
        f'  actsteer generate --steering {quoted} --strength 0 0.5 1 -- "My weekend was"\n'
        f"  actsteer inspect {quoted} --plot football.png\n"
        f"  actsteer serve --steering football={quoted}   # then call it with the openai client\n"
        "Fit your own: actsteer fit --source a.txt --target b.txt -o mine.safetensors "
        "(actsteer fit --help; examples/ has scripts for detoxification, export, serving)"
    )


@app.command(rich_help_panel=LM_PANEL)
def methods() -> None:
    """List the registered steering methods."""
    table = Table(title="steering methods")
    table.add_column("method", style="bold")
    table.add_column("description")
    table.add_column("strength λ")
    table.add_column("default support")
    table.add_column("default pooling")
    table.add_column("modes")
    for name, method in sorted(METHODS.items()):
        lo_hi = method.strength_range
        span = "any" if lo_hi is None else f"[{lo_hi[0]:g}, {lo_hi[1]:g}]"
        table.add_row(
            name, method.description, span, method.default_support, method.default_pooling,
            ", ".join(method.modes),
        )  # fmt: skip
    console().print(table)
