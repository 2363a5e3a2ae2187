"""Evaluation commands: eval (one task), sweep (tasks × steerings × λ grid), plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from actsteer.cli.core import EVAL_PANEL, app, console, load_lm, status
from actsteer.cli.options import (
    ChatOption,
    DeviceOption,
    DtypeOption,
    ExtrapolateOption,
    ForceOption,
    ModelOption,
    StrengthOption,
    SupportOption,
)
from actsteer.errors import ActSteerError
from actsteer.outputs import check_output, written_file

if TYPE_CHECKING:
    from actsteer.steering import Steering


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
    from actsteer.steering import Steering

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


@app.command("eval", rich_help_panel=EVAL_PANEL)
def eval_(
    task: Annotated[str, typer.Argument(help="An evaluation task.", metavar="TASK")],
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    steering_path: Annotated[
        Path | None,
        typer.Option(
            "--steering",
            help="A steering file (or hf:USER/REPO); omit to evaluate the plain model.",
        ),
    ] = None,
    strength: StrengthOption = None,
    data: Annotated[
        str | None,
        typer.Option(help="The task's data: a file, or hf:ID[:CONFIG[:SPLIT]].", metavar="PATH"),
    ] = None,
    support: SupportOption = None,
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
    force: ForceOption = False,
    extrapolate: ExtrapolateOption = None,
    chat: ChatOption = False,
) -> None:
    """Evaluate TASK (toxicity, perplexity, truthfulqa, mmlu, concept) at one or more λ.

    Prints a table: rows are strengths, columns the task's metrics with 95% intervals where
    the task gives them. Example: actsteer eval perplexity --steering s.safetensors -s 0 1
    """
    from actsteer.evaluation.common import describe_steering, jsonable
    from actsteer.evaluation.sweep import parse_task_options
    from actsteer.evaluation.tasks import TASKS, get_task
    from actsteer.models import model_for
    from actsteer.steering import Steering
    from actsteer.strengths import parse_strength_specs, resolve_strengths

    spec = get_task(task)
    if out is not None:
        check_output(out, force)
    options = parse_task_options(settings or [], [task])[task]
    if data is not None:
        options["data"] = data
    if support is not None:
        options["support"] = support
    if chat:
        if not spec.generation:
            raise ActSteerError(
                f"--chat formats generation prompts; {task} scores given text as it is "
                f"(tasks with prompts: {', '.join(n for n, t in TASKS.items() if t.generation)})"
            )
        options["sampling"] = {**dict(options.get("sampling") or {}), "chat": True}
    steering = Steering.load(steering_path) if steering_path is not None else None
    if steering is not None and extrapolate is not None:
        steering = steering.extrapolated(extrapolate)
    strengths = resolve_strengths(
        steering,
        parse_strength_specs(strength) if strength else None,
        support=support,
        needs="--steering FILE",
    )
    model = model_for(steering, model)
    lm, tok = load_lm(model, device, dtype)
    status(f"Evaluating {task} on {model} …")
    results = spec.evaluate_grid(lm, tok, steering, strengths, **options)
    title = f"{task} — {model}" + (f" steered by {steering_path}" if steering else " (plain)")
    used = {str(s["data"]) for r in results if (s := getattr(r, "settings", {})).get("data")}
    title += f" — data: {', '.join(sorted(used))}" if used else ""  # what was read, not a default
    console().print(metrics_table(results, dict(spec.result_type.METRICS), title))
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
        with written_file(out) as scratch:
            scratch.write_text(json.dumps(jsonable(content), indent=1), encoding="utf-8")
        typer.echo(f"Wrote results to {out}")


@app.command(rich_help_panel=EVAL_PANEL)
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
    strength: StrengthOption = None,
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
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    extrapolate: ExtrapolateOption = None,
    chat: ChatOption = False,
) -> None:
    """Run tasks × steerings × a λ grid into a resumable JSON file with one PNG per task.

    Points already in --out (same steering, task options and λ) are skipped, so an interrupted
    or extended sweep picks up where it stopped. A --steering needs the grid as --strength;
    --model defaults to the first steering's.
    """
    from actsteer.evaluation.sweep import load_results, parse_task_options, run_sweep
    from actsteer.evaluation.tasks import TASKS, get_task
    from actsteer.models import model_for
    from actsteer.strengths import parse_strength_specs, resolve_strengths

    tasks = list(dict.fromkeys(tasks))
    for task in tasks:
        get_task(task)
    if out.suffix.lower() != ".json":
        raise ActSteerError(f"--out should end in .json, got {out}")
    options = parse_task_options(settings or [], tasks)
    if chat:
        generating = [task for task in tasks if get_task(task).generation]
        if not generating:
            raise ActSteerError(
                "--chat formats generation prompts, and none of these tasks generates (tasks "
                f"with prompts: {', '.join(n for n, t in TASKS.items() if t.generation)})"
            )
        for task in generating:  # scoring tasks read their text as it is
            task_options = options.setdefault(task, {})
            task_options["sampling"] = {**dict(task_options.get("sampling") or {}), "chat": True}
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
        resolve_strengths(steering, strengths)
    model = model_for(next(iter(named.values()), None), model)
    planned = len(tasks) * sum(1 if s is None else len(strengths) for s in steerings.values())
    before = len((load_results(out) or {}).get("entries", []))
    lm, tok = load_lm(model, device, dtype)
    status(
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


@app.command(rich_help_panel=EVAL_PANEL)
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
