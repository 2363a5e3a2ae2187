"""The `actsteer` command line: fit, generate, export, inspect, eval, sweep, plot, methods, demo.

Every user error (bad option, missing file, ActSteerError) ends in one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from actsteer.capture import POOLINGS
from actsteer.diffusion import generate_images, image_grid, load_pipeline
from actsteer.errors import ActSteerError
from actsteer.export import export as export_checkpoint
from actsteer.fit import MODES
from actsteer.fit import fit as fit_steering
from actsteer.generation import generate_grid
from actsteer.guidance import GUIDANCE_MODES as CFG_MODES
from actsteer.hooks import POSITIONS
from actsteer.maps import SUPPORTS
from actsteer.methods import METHODS, get_method
from actsteer.models import DEFAULT_MODEL, load_model
from actsteer.steering import Steering

STRENGTH_FLAGS = ("--strength", "-s")
DEMO_PROMPTS = (
    "I went to the park and",
    "My favourite thing about Sundays is",
    "Yesterday the news said that",
)
DEMO_STRENGTHS = (0.0, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# argv normalisation and one-line errors


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def normalise_argv(args: Sequence[str]) -> list[str]:
    """Let one --strength flag take several numbers: `--strength 0 0.5 1`.

    Tokens right after --strength (or -s, or --strength=X) that parse as floats become repeated
    `--strength X` options. `--` ends options, so a prompt that looks like a number goes after it.
    """
    args = list(args)
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        out.append(token)
        i += 1
        if token in STRENGTH_FLAGS:
            if i < len(args):  # the flag's own value, whatever it is (typer checks it)
                out.append(args[i])
                i += 1
        elif not token.startswith("--strength="):
            continue
        while i < len(args) and _is_float(args[i]):
            out += ["--strength", args[i]]
            i += 1
    return out


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` as one line on stderr; return the Exit to raise."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    return typer.Exit(code)


class _Group(TyperGroup):
    """The app's group: normalises argv and turns every user error into one stderr line."""

    def main(self, args: Sequence[str] | None = None, *pargs: Any, **kwargs: Any) -> Any:
        args = sys.argv[1:] if args is None else args
        return super().main(normalise_argv(args), *pargs, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except typer.TyperException as err:
            raise self._usage_error(err) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException as err:
            raise self._usage_error(err) from None
        except ActSteerError as err:
            raise _fail(str(err)) from None
        except FileNotFoundError as err:
            name = err.filename if err.filename is not None else str(err)
            raise _fail(f"file not found: {name}") from None

    @staticmethod
    def _usage_error(err: typer.TyperException) -> Exception:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `actsteer`: show the help
            return err
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _fail(err.format_message() + hint, getattr(err, "exit_code", 2))


app = typer.Typer(
    cls=_Group,
    name="actsteer",
    help=(
        "Steer Hugging Face causal LMs by transporting activations (AcT). "
        "Fit a steering from a source and a target text file, then generate with a strength "
        "λ in [0, 1]: 0 is the untouched model, 1 the full transport. "
        "Try `actsteer demo` first."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _console(stderr: bool = False) -> Console:
    """A rich console; wide when not a terminal, so piped tables don't wrap at 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False)


def _status(message: str) -> None:
    """A progress line on stderr (stdout keeps the results)."""
    typer.echo(message, err=True)


def read_texts(path: str | Path, what: str = "texts") -> list[str]:
    """One text per line of a UTF-8 file, blank lines skipped; a missing file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ActSteerError(f"{what} file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ActSteerError(f"{what} file {path} is not UTF-8 text: {err}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ActSteerError(f"{what} file {path} has no text (one text per line expected)")
    return texts


def package_texts(name: str) -> list[str]:
    """The sentences of one of the package's own data files (src/actsteer/data/NAME)."""
    text = importlib.resources.files("actsteer").joinpath("data", name).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_choice(value: str | None, choices: Sequence[str], option: str) -> None:
    if value is not None and value not in choices:
        raise ActSteerError(f"{option} {value!r} is not one of: {', '.join(choices)}")


def _format_strength(strength: float) -> str:
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
    if max_new_tokens < 1:
        raise ActSteerError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
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
    specs: Sequence[str],
) -> tuple[list[tuple[str, Steering, float]], tuple[str, Steering] | None]:
    """Split `--steering FILE[:λ]` values into fixed (file, steering, λ) and the swept one."""
    fixed: list[tuple[str, Steering, float]] = []
    swept: tuple[str, Steering] | None = None
    for spec in specs:
        path, _, lam = spec.rpartition(":")
        if path and _is_float(lam):
            steering = Steering.load(path)
            steering.check_strength(float(lam))
            fixed.append((path, steering, float(lam)))
        elif swept is not None:
            raise ActSteerError(
                f"only one --steering can be swept over --strength; give {spec} a fixed "
                f"strength as {spec}:λ"
            )
        else:
            swept = (spec, Steering.load(spec))
    return fixed, swept


def _load(model_name: str) -> tuple[Any, Any]:
    _status(f"Loading model {model_name} …")
    return load_model(model_name)


def parse_strength_specs(specs: Sequence[str]) -> list[float]:
    """λ values from --strength items: numbers, "START:STOP:STEP" ranges or "a,b,c" lists."""
    from actsteer.evaluation.sweep import parse_strengths

    values = [s for spec in specs for s in parse_strengths(spec)]
    return list(dict.fromkeys(values))


def _steering_model(steering: Steering | None, model: str | None) -> str:
    """The model to load: the given one, else the steering's, else the default."""
    if model is None and steering is not None:
        model = steering.info.model_name
    return model or DEFAULT_MODEL


def _format_metric(value: Any, interval: Sequence[Any] | None) -> str:
    """A metric value, with its 95% interval when there is one."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    text = f"{value:.4g}" if isinstance(value, int | float) else str(value)
    if interval is not None and None not in interval:
        text += f" [{interval[0]:.4g}, {interval[1]:.4g}]"
    return text


def metrics_table(results: Sequence[Any], labels: dict[str, str], title: str) -> Table:
    """Rows = strengths λ, columns = the task's metrics (value [95% interval])."""
    names = [m for m in labels if any(m in r.metrics() for r in results)]
    names += [m for r in results for m in r.metrics() if m not in names]
    table = Table(title=title, show_lines=False, min_width=min(len(title) + 4, 120))
    table.add_column("λ", justify="right", style="bold")
    for name in names:
        table.add_column(Text(labels.get(name, name)), justify="right")
    for result in results:
        metrics, intervals = result.metrics(), result.intervals()
        row = [_format_metric(metrics.get(m), intervals.get(m)) for m in names]
        table.add_row(f"{result.strength:g}", *row)
    return table


def parse_named_steerings(specs: Sequence[str]) -> dict[str, Steering]:
    """`NAME=FILE` (or just FILE, named after its stem) → loaded steerings, in order."""
    steerings: dict[str, Steering] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        name = name.strip()
        if not name or not path:
            raise ActSteerError(f"--steering {spec!r} should look like NAME=FILE")
        if name in steerings:
            raise ActSteerError(f"two steerings are named {name!r}; name them with NAME=FILE")
        steerings[name] = Steering.load(path)
    return steerings


# ---------------------------------------------------------------------------------------------
# commands


@app.command()
def fit(
    source: Annotated[
        Path,
        typer.Option(
            "--source", help="Text file, one text per line: what to move away from.", metavar="FILE"
        ),
    ],
    target: Annotated[
        Path,
        typer.Option(
            "--target", help="Text file, one text per line: what to move toward.", metavar="FILE"
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write the steering (.safetensors)."),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Built-in alias, local folder or hub id.")
    ] = DEFAULT_MODEL,
    modules: Annotated[
        str | None,
        typer.Option(
            help="Preset (post-attn-ln (default), layernorms, attn-out, mlp-out; for pipelines "
            "unet-norms (default), dit-blocks, text-encoder) or a regex fully matching module "
            "names.",
            metavar="PRESET|REGEX",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="Estimator; see `actsteer methods`.", metavar="NAME")
    ] = "linear-act",
    mode: Annotated[
        str,
        typer.Option(
            help="independent: each module fitted on the plain model; sequential: on activations "
            "already moved by upstream maps.",
            metavar="|".join(MODES),
        ),
    ] = "independent",
    pooling: Annotated[
        str | None,
        typer.Option(
            help="How token activations become one sample per text. Default: the method's "
            "(mean for the AcT methods).",
            metavar="|".join(POOLINGS),
        ),
    ] = None,
    support: Annotated[
        str | None,
        typer.Option(
            help="Where maps apply: quantile ranges of the source activations, or all (use all "
            "to induce a concept). Default: the method's.",
            metavar="|".join(SUPPORTS),
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.", min=1)] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens kept per text.", min=1)] = 128,
    pipeline: Annotated[
        str | None,
        typer.Option(
            help="A diffusers text-to-image pipeline (folder or hub id) to steer instead of a "
            "language model; presets unet-norms, dit-blocks, text-encoder.",
            metavar="DIR",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Pipelines: denoising steps.", min=1)] = 20,
    guidance_scale: Annotated[float, typer.Option(help="Pipelines: guidance scale.")] = 5.0,
    size: Annotated[
        int | None, typer.Option(help="Pipelines: image height and width (default: its own).")
    ] = None,
) -> None:
    """Fit a steering that moves the model's activations on SOURCE texts onto TARGET's."""
    get_method(method)
    _check_choice(mode, MODES, "--mode")
    _check_choice(pooling, POOLINGS, "--pooling")
    _check_choice(support, SUPPORTS, "--support")
    if output.suffix != ".safetensors":
        raise ActSteerError(f"--output should end in .safetensors, got {output}")
    source_texts = read_texts(source, "source")
    target_texts = read_texts(target, "target")
    data = {"source_file": str(source), "target_file": str(target)}
    if pipeline is not None:
        _status(f"Loading pipeline {pipeline} …")
        pipe = load_pipeline(pipeline)
        _status(
            f"Fitting {method} on {pipeline}: {len(source_texts)} → {len(target_texts)} prompts"
        )
        options: dict[str, Any] = {"steps": steps, "guidance_scale": guidance_scale}
        if size is not None:
            options.update(height=size, width=size)
        steering = fit_steering(
            pipe, source=source_texts, target=target_texts, modules=modules, method=method,
            support=support, data=data, pipeline_options=options,
        )  # fmt: skip
        typer.echo(f"Saved steering to {steering.save(output)} ({len(steering.maps)} modules)")
        return
    lm, tok = _load(model)
    _status(
        f"Fitting {method} ({mode}) on {model}: {len(source_texts)} source → "
        f"{len(target_texts)} target texts, modules {modules or 'post-attn-ln'!r} …"
    )
    start = time.perf_counter()
    steering = fit_steering(
        lm,
        tok,
        source=source_texts,
        target=target_texts,
        modules=modules,
        method=method,
        mode=mode,
        pooling=pooling,
        support=support,
        batch_size=batch_size,
        max_length=max_length,
        data=data,
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


@app.command()
def generate(
    prompts: Annotated[
        list[str],
        typer.Argument(
            help="One or more prompts. Put `--` before the prompts if one starts with - or "
            "looks like a number right after --strength.",
            metavar="PROMPT",
        ),
    ],
    steering_specs: Annotated[
        list[str] | None,
        typer.Option(
            "--steering",
            help="A steering file from `actsteer fit`; omit for plain. Repeat to compose: "
            "FILE:λ applies FILE at a fixed λ (in the given order) before the one FILE without "
            "a λ, which is swept over --strength.",
            metavar="FILE[:λ]",
        ),
    ] = None,
    strength: Annotated[
        list[float] | None,
        typer.Option(
            "--strength",
            "-s",
            help="λ values, several after one flag: --strength 0 0.5 1 (or repeat the flag). "
            "`--` ends options. Default: the steering's default strength.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model; default: the one the steering was fitted on."),
    ] = None,
    support: Annotated[
        str | None,
        typer.Option(
            help="Support override for the swept steering. Default: the steering's.",
            metavar="|".join(SUPPORTS),
        ),
    ] = None,
    positions: Annotated[
        str,
        typer.Option(help="Token positions steered.", metavar="|".join(POSITIONS)),
    ] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per row.")] = 40,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample (seeded) or decode greedily.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    repetition_penalty: Annotated[
        float, typer.Option(help="Penalty > 1 discourages repeating tokens (1 = off).")
    ] = 1.3,
) -> None:
    """Generate from PROMPTs at several strengths in ONE batched call; print a table.

    Rows are prompts, columns strengths λ. Example:
    actsteer generate --steering s.safetensors --strength 0 0.5 1 -- "I went to the park and"
    """
    kwargs = _generate_kwargs(max_new_tokens, sample, temperature, top_p, repetition_penalty)
    _check_choice(support, SUPPORTS, "--support")
    _check_choice(positions, POSITIONS, "--positions")
    fixed, swept = parse_steerings(steering_specs or [])
    steering = swept[1] if swept else None
    origin = fixed[0][1] if fixed else steering
    if steering is not None:
        strengths = list(strength or [steering.info.default_strength])
        steering.check_strength(strengths)
        columns = [_format_strength(s) for s in strengths]
    else:
        if strength or support:
            raise ActSteerError("--strength and --support need a --steering FILE without ':λ'")
        strengths = None
        columns = (
            ["composed: " + ", ".join(f"{p}:{lam:g}" for p, _, lam in fixed)]
            if fixed
            else ["plain"]
        )
    if origin is not None:
        model = model or origin.info.model_name
    model = model or DEFAULT_MODEL
    lm, tok = _load(model)
    _status(
        f"Generating {len(prompts)} prompt(s) × {len(columns)} strength(s) in one batched call …"
    )
    if sample:
        torch.manual_seed(seed)
    texts = generate_grid(
        lm,
        tok,
        prompts,
        strengths,
        steering,
        support,
        positions,
        fixed=[(st, lam) for _, st, lam in fixed],
        **kwargs,
    )
    names = [p for p, *_ in fixed] + ([swept[0]] if swept else [])
    title = f"{model}" + (f" steered by {' then '.join(names)}" if names else "")
    _console().print(grid_table(prompts, columns, texts, title))


@app.command()
def export(
    steering_path: Annotated[
        Path, typer.Option("--steering", help="A steering file from `actsteer fit`.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the steered checkpoint.")
    ],
    strength: Annotated[float, typer.Option("--strength", "-s", help="The fixed λ.")] = 1.0,
    support: Annotated[
        str,
        typer.Option(help="Only 'all' is affine and folds exactly.", metavar="all"),
    ] = "all",
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model; default: the one the steering was fitted on."),
    ] = None,
) -> None:
    """Fold a steering into the weights and save a checkpoint stock transformers loads.

    The result runs at the plain model's speed with no actsteer import:
    AutoModelForCausalLM.from_pretrained(OUTPUT). Serving engines that read transformers
    checkpoints can serve it.
    """
    steering = Steering.load(steering_path)
    steering.check_strength(strength)
    model = model or steering.info.model_name or DEFAULT_MODEL
    lm, tok = _load(model)
    probe = tok(["The weather today is"], return_tensors="pt")
    with torch.inference_mode(), steering.applied(lm, strength, support):
        hooked = lm(**probe).logits
    export_checkpoint(steering, lm, tok, output, strength, support)
    with torch.inference_mode():
        folded = lm(**probe).logits
    typer.echo(f"Saved the steered checkpoint (λ = {strength:g}, support {support}) to {output}")
    gap = (folded - hooked).abs().max().item()
    typer.echo(f"  folded vs hooked logits on a probe prompt: max |Δ| = {gap:.2e}")


@app.command("generate-image")
def generate_image(
    pipeline: Annotated[str, typer.Option(help="A diffusers pipeline folder or hub id.")],
    prompts: Annotated[
        list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for more rows.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the PNG grid.")],
    steering_path: Annotated[
        Path | None, typer.Option("--steering", help="A steering fitted on this pipeline.")
    ] = None,
    strength: Annotated[
        list[float] | None,
        typer.Option("--strength", "-s", help="λ values, several after one flag: -s 0 0.5 1."),
    ] = None,
    support: Annotated[
        str | None, typer.Option(help="Support override.", metavar="|".join(SUPPORTS))
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.", min=1)] = 20,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 5.0,
    seed: Annotated[int, typer.Option(help="Noise seed of the first prompt (+1 per row).")] = 0,
    size: Annotated[int | None, typer.Option(help="Image height and width.")] = None,
    cfg: Annotated[
        str,
        typer.Option(
            help="Classifier-free guidance: steer its conditional half only, or both halves.",
            metavar="|".join(CFG_MODES),
        ),
    ] = "conditional",
) -> None:
    """Render a labelled PNG grid: rows are prompts, columns strengths λ (one pipeline call).

    Every column of a row starts from the same noise, so columns differ only by the steering.
    """
    _check_choice(support, SUPPORTS, "--support")
    _check_choice(cfg, CFG_MODES, "--cfg")
    if output.suffix.lower() != ".png":
        raise ActSteerError(f"--output should end in .png, got {output}")
    steering = Steering.load(steering_path) if steering_path is not None else None
    if steering is None and (strength or support):
        raise ActSteerError("--strength and --support need --steering FILE")
    strengths = list(strength or ([1.0] if steering is not None else [0.0]))
    if steering is not None:
        steering.check_strength(strengths)
    _status(f"Loading pipeline {pipeline} …")
    pipe = load_pipeline(pipeline)
    extra: dict[str, Any] = {} if size is None else {"height": size, "width": size}
    _status(f"Rendering {len(prompts)} prompt(s) × {len(strengths)} strength(s) in one call …")
    images = generate_images(
        pipe, prompts, strengths, steering, support=support, steps=steps,
        guidance_scale=guidance_scale, seed=seed, guidance=cfg, **extra,
    )  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, prompts, strengths).save(output)
    typer.echo(f"Saved {len(prompts)}×{len(strengths)} grid to {output}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A steering file (.safetensors).")],
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
            help="With --plot: source texts (one per line) whose activations are drawn before "
            "and after transport (λ = 1).",
            metavar="FILE",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="For --data; default: the steering's model."),
    ] = None,
    module: Annotated[
        str | None,
        typer.Option(help="For --data: the module to show (default: the middle one)."),
    ] = None,
    support: Annotated[
        str | None,
        typer.Option(help="For --data: support override.", metavar="|".join(SUPPORTS)),
    ] = None,
    max_length: Annotated[int, typer.Option(help="For --data: tokens kept per text.", min=1)] = 64,
) -> None:
    """Describe a steering file: method, model, data and per-module map statistics.

    With --plot, also a figure of what it does at a glance (see --data for unit histograms).
    """
    _check_choice(support, SUPPORTS, "--support")
    if plot is None and data is not None:
        raise ActSteerError("--data is drawn in the figure: give --plot PNG as well")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ActSteerError(f"--plot should end in .png, got {plot}")
    steering = Steering.load(path)
    if module is not None and module not in steering.maps:
        raise ActSteerError(
            f"--module {module!r} is not steered by {path}; it steers {len(steering.maps)} "
            f"modules, e.g. {next(iter(steering.maps), '-')}"
        )
    info = steering.info
    console = _console()
    console.print(f"[bold]{path}[/bold]")
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
    for key, value in rows:
        console.print(Text(f"{key:>16}: {value}"))
    table = Table(title="maps T(a) = ω ⊙ a + β per module", show_edge=False)
    table.add_column("module", overflow="fold")
    for name in ("D", "ω mean", "ω min", "ω max", "β mean", "max |β|"):
        table.add_column(name, justify="right")
    for name, amap in steering.maps.items():
        omega, beta = amap.omega.float(), amap.beta.float()
        table.add_row(
            name,
            str(amap.dim),
            *(f"{v:.3f}" for v in (omega.mean(), omega.min(), omega.max())),
            *(f"{v:.3f}" for v in (beta.mean(), beta.abs().max())),
        )
    console.print(table)
    if plot is not None:
        _inspect_plot(steering, path, plot, data, model, module, support, max_length)


def _inspect_plot(
    steering: Steering,
    path: Path,
    plot: Path,
    data: Path | None,
    model: str | None,
    module: str | None,
    support: str | None,
    max_length: int,
) -> None:
    """Draw `inspect --plot`: record the --data texts at one module when given, then save."""
    from actsteer.capture import record
    from actsteer.evaluation.inspect_plot import middle_module, steering_figure

    source = None
    module = module or middle_module(steering)
    if data is not None:
        texts = read_texts(data, "--data")
        lm, tok = _load(_steering_model(steering, model))
        _status(f"Recording {len(texts)} text(s) at {module} …")
        source = record(
            lm, tok, texts, [module], pooling="all", max_length=max_length, progress=False
        )[module]
    figure = steering_figure(
        steering, source, module, support=support, title=f"{path.name}: {steering.method}, "
        f"{len(steering.maps)} steered modules",
    )  # fmt: skip
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=100, bbox_inches="tight")
    typer.echo(f"Saved the figure to {plot}")


@app.command("eval")
def eval_(
    task: Annotated[str, typer.Argument(help="An evaluation task.", metavar="TASK")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model; default: the steering's, else the default."),
    ] = None,
    steering_path: Annotated[
        Path | None,
        typer.Option("--steering", help="A steering file; omit to evaluate the plain model."),
    ] = None,
    strength: Annotated[
        list[str] | None,
        typer.Option(
            "--strength",
            "-s",
            help="λ values: several numbers after one flag (-s 0 0.5 1), START:STOP:STEP or "
            "a,b,c. Default: the steering's default strength.",
            metavar="λ|START:STOP:STEP",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="The task's data: a file, or hf:ID[:CONFIG[:SPLIT]].", metavar="PATH"),
    ] = None,
    support: Annotated[
        str | None, typer.Option(help="Support override.", metavar="|".join(SUPPORTS))
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A task option as KEY=VALUE (VALUE read as JSON when it parses), e.g. "
            "--set max_tokens=1024. Repeat for more.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the results as JSON.")
    ] = None,
) -> None:
    """Evaluate TASK (toxicity, perplexity, truthfulqa, mmlu, concept) at one or more λ.

    Prints a table: rows are strengths, columns the task's metrics with 95% intervals where
    the task gives them. Example: actsteer eval perplexity --steering s.safetensors -s 0 1
    """
    from actsteer.evaluation.common import describe_steering, jsonable
    from actsteer.evaluation.registry import get_task
    from actsteer.evaluation.sweep import parse_task_options

    spec = get_task(task)
    _check_choice(support, SUPPORTS, "--support")
    options = parse_task_options(settings or [], [task])[task]
    if data is not None:
        options["data"] = data
    if support is not None:
        options["support"] = support
    steering = Steering.load(steering_path) if steering_path is not None else None
    strengths = parse_strength_specs(strength) if strength else None
    if steering is None and (strengths or support):
        raise ActSteerError("--strength and --support need --steering FILE")
    if steering is not None and strengths:
        steering.check_strength(strengths)
    model = _steering_model(steering, model)
    lm, tok = _load(model)
    _status(f"Evaluating {task} on {model} …")
    results = spec.evaluate_grid(lm, tok, steering, strengths, **options)
    title = f"{task} — {model}" + (f" steered by {steering_path}" if steering else " (plain)")
    _console().print(metrics_table(results, dict(spec.result_type.METRICS), title))
    if out is not None:
        content = {
            "format": "actsteer-eval/1",
            "task": task,
            "model": model,
            "steering": None if steering_path is None else str(steering_path),
            "steering_info": describe_steering(steering),
            "options": options,
            "metric_labels": dict(spec.result_type.METRICS),
            "results": [
                {
                    "strength": float(r.strength),
                    "metrics": r.metrics(),
                    "intervals": r.intervals(),
                    "result": r,
                }
                for r in results
            ],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(jsonable(content), indent=1), encoding="utf-8")
        typer.echo(f"Wrote results to {out}")


@app.command()
def sweep(
    tasks: Annotated[
        list[str],
        typer.Option("--task", "-t", help="A task to run; repeat for more.", metavar="TASK"),
    ],
    steering_specs: Annotated[
        list[str] | None,
        typer.Option(
            "--steering",
            help="NAME=FILE (or FILE, named after its stem); repeat to compare steerings.",
            metavar="NAME=FILE",
        ),
    ] = None,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline/--no-baseline",
            help="Also evaluate the plain model (as 'original', a reference line).",
        ),
    ] = True,
    strength: Annotated[
        list[str] | None,
        typer.Option(
            "--strength",
            "-s",
            help="λ grid: START:STOP:STEP (STOP included), a,b,c, or several numbers after one "
            "flag.",
            metavar="λ|START:STOP:STEP",
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A task option: TASK.KEY=VALUE, or KEY=VALUE for every task taking KEY.",
            metavar="[TASK.]KEY=VALUE",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The results JSON; PNGs go next to it.")
    ] = Path("results/sweep.json"),
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model; default: the first steering's model."),
    ] = None,
    extrapolate: Annotated[
        float | None,
        typer.Option(
            "--extrapolate",
            help="Accept λ up to this value beyond a method's range (AcT: λ > 1 pushes past "
            "the fitted transport), e.g. to see where an induction saturates.",
            metavar="UPPER",
        ),
    ] = None,
) -> None:
    """Run tasks × steerings × a λ grid into a resumable JSON file with one PNG per task.

    Points already in --out (same steering, task options and λ) are skipped, so an interrupted
    or extended sweep picks up where it stopped.
    """
    from actsteer.evaluation.registry import get_task
    from actsteer.evaluation.sweep import load_results, parse_task_options, run_sweep

    tasks = list(dict.fromkeys(tasks))
    for task in tasks:
        get_task(task)
    if out.suffix.lower() != ".json":
        raise ActSteerError(f"--out should end in .json, got {out}")
    options = parse_task_options(settings or [], tasks)
    named = parse_named_steerings(steering_specs or [])
    if not named and not baseline:
        raise ActSteerError("nothing to evaluate: give --steering NAME=FILE or keep the baseline")
    if named and not strength:
        raise ActSteerError("give the λ grid with --strength, e.g. --strength 0:1:0.25")
    if not named and strength:
        raise ActSteerError("--strength needs a --steering NAME=FILE")
    strengths = parse_strength_specs(strength or [])
    steerings: dict[str, Steering | None] = {"original": None} if baseline else {}
    if "original" in named and baseline:
        raise ActSteerError("'original' names the plain model; name the steering otherwise")
    if extrapolate is not None:
        named = {name: steering.extrapolated(extrapolate) for name, steering in named.items()}
    steerings.update(named)
    for steering in named.values():
        steering.check_strength(strengths)
    model = _steering_model(next(iter(named.values()), None), model)
    planned = len(tasks) * sum(1 if s is None else len(strengths) for s in steerings.values())
    before = len((load_results(out) or {}).get("entries", []))
    lm, tok = _load(model)
    _status(
        f"Sweeping {', '.join(tasks)} × {', '.join(steerings)} over λ = "
        f"{', '.join(f'{s:g}' for s in strengths) or '0'} on {model} …"
    )
    content = run_sweep(lm, tok, steerings, options, strengths, out, model_name=model)
    new = len(content["entries"]) - before
    typer.echo(
        f"Wrote {out}: {new} new point(s), {planned - new} of {planned} already there (skipped)"
    )
    for task in tasks:
        png = out.parent / f"{out.stem}_{task}.png"
        if png.exists():
            typer.echo(f"  plot: {png}")


@app.command()
def plot(
    results: Annotated[Path, typer.Argument(help="A results JSON from `actsteer sweep`.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Folder for the PNGs (default: the JSON's).")
    ] = None,
) -> None:
    """Redraw the PNG plots of a sweep from its results JSON (one per task)."""
    from actsteer.evaluation.plots import plot_sweep
    from actsteer.evaluation.sweep import load_results

    content = load_results(results)
    if content is None:
        raise ActSteerError(f"sweep results file not found: {results}")
    if not content.get("entries"):
        raise ActSteerError(f"{results} holds no results yet")
    written = plot_sweep(content, out_dir or results.parent, results.stem)
    for path in written:
        typer.echo(f"Saved {path}")


@app.command()
def methods() -> None:
    """List the registered steering methods."""
    table = Table(title="steering methods")
    table.add_column("method", style="bold")
    table.add_column("description")
    table.add_column("strength λ")
    table.add_column("default support")
    table.add_column("default pooling")
    for name, method in sorted(METHODS.items()):
        lo_hi = method.strength_range
        span = "any" if lo_hi is None else f"[{lo_hi[0]:g}, {lo_hi[1]:g}]"
        table.add_row(
            name, method.description, span, method.default_support, method.default_pooling
        )
    _console().print(table)


@app.command()
def demo(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Built-in alias, local folder or hub id.")
    ] = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per row.", min=1)] = 40,
) -> None:
    """Induce the concept "football": fit neutral → football sentences, generate at λ = 0, ½, 1.

    Uses the package's own sentence files, Linear-AcT on all layer norms with support "all",
    then one batched greedy generation (repetition penalty 1.3) for three neutral prompts.
    """
    source, target = package_texts("neutral.txt"), package_texts("football.txt")
    lm, tok = _load(model)
    _status(
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
    _status(f"Fitted {len(steering.maps)} modules in {time.perf_counter() - start:.1f} s.")
    _status(
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
    )
    columns = [_format_strength(s) for s in DEMO_STRENGTHS]
    title = f"{model}: λ = 0 is the untouched model, λ = 1 talks football"
    _console().print(grid_table(DEMO_PROMPTS, columns, texts, title))


def main() -> None:
    """Entry point equivalent to the `actsteer` console script."""
    app()


if __name__ == "__main__":
    main()
