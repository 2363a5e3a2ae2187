"""Sweeps: tasks × steerings × a grid of λ, written to a results JSON as each piece finishes.

The JSON is rewritten atomically after every finished group of strengths, so a killed run
loses at most the group in flight, and a rerun skips grid points already there. A point is
identified by (steering name, steering digest, task, task options, λ): changing a steering's
maps or a task's options makes new points rather than mixing them with old ones. Generation
tasks evaluate a group of λ (group_size, default 4) as per-row strengths in the same batches;
likelihood tasks run one λ per pass. A steering of None is the plain model, evaluated at λ=0
once and drawn as a reference line. Plots (matplotlib PNG) are redrawn after each task.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from actsteer.errors import ActSteerError
from actsteer.evaluation.common import describe_steering, jsonable
from actsteer.evaluation.plots import plot_sweep
from actsteer.evaluation.tasks import TASKS, get_task
from actsteer.steering import Steering
from actsteer.strengths import parse_strengths as parse_strengths  # the grammar, re-exported

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from actsteer.evaluation.tasks.concept import ConceptJudge

FORMAT = "actsteer-sweep/1"
GROUP_SIZE = 4


def parse_task_options(pairs: Sequence[str], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Options per task from "KEY=VALUE" (every listed task taking KEY) or "TASK.KEY=VALUE".

    VALUE is read as JSON when it parses (numbers, true/false/null, lists, objects), else kept
    as a string. An option no listed task accepts is an error naming the tasks' options.
    """
    options: dict[str, dict[str, Any]] = {task: {} for task in tasks}
    accepted = {
        task: set(inspect.signature(get_task(task).evaluate_grid).parameters) - _POSITIONAL
        for task in tasks
    }
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ActSteerError(f"option {pair!r} must look like KEY=VALUE or TASK.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        task, dot, name = key.strip().rpartition(".")
        targets = [task] if dot else [t for t in tasks if name in accepted[t]]
        if dot and task not in options:
            raise ActSteerError(f"option {pair!r} is for task {task!r}, which is not in this run")
        if not targets or any(name not in accepted[t] for t in targets):
            known = {t: sorted(accepted[t]) for t in (targets or tasks)}
            raise ActSteerError(f"no task here takes option {name!r}; options: {known}")
        for target in targets:
            options[target][name] = value
    return options


_POSITIONAL = {"model", "tokenizer", "steering", "strengths", "progress"}


def steering_digest(steering: Steering | None) -> str:
    """The steering's digest (Steering.digest), "plain" for no steering."""
    return "plain" if steering is None else steering.digest()


def options_key(options: Mapping[str, Any]) -> str:
    """A short hash of a task's options (what makes two runs of a task comparable)."""
    text = json.dumps(jsonable(dict(options)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _point_key(steering: str, digest: str, task: str, options: str, strength: float) -> tuple:
    return (steering, digest, task, options, round(float(strength), 9))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write atomically: a temporary file next to it, then rename over it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=1), encoding="utf-8")
    os.replace(partial, path)


def load_results(path: str | Path) -> dict[str, Any] | None:
    """The content of a sweep results file, or None when it does not exist yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ActSteerError(f"sweep results file {path} is not valid JSON: {err}") from None
    if content.get("format") != FORMAT:
        raise ActSteerError(f"{path} is not an actsteer sweep results file ({FORMAT})")
    return content


def run_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steerings: Mapping[str, Steering | None],
    tasks: Sequence[str] | Mapping[str, Mapping[str, Any]],
    strengths: Sequence[float] | Mapping[str, Sequence[float]],
    out: str | Path,
    *,
    model_name: str | None = None,
    group_size: int | None = GROUP_SIZE,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every task for every steering over a λ grid; returns the results content.

    steerings: display name → Steering (None: the plain model).
    tasks: task names, or task name → options for its `evaluate_grid` (e.g. subset sizes).
    strengths: one grid for all steerings, or a grid per steering name (methods differ in
      range: AcT methods take [0, 1], ActAdd and ITI-c any λ).
    out: the results JSON path; PNGs go next to it as <stem>_<task>.png.
    group_size: λ values per batched call of a generation task (None: all at once).
    """
    out = Path(out)
    task_options = {t: {} for t in tasks} if not isinstance(tasks, Mapping) else dict(tasks)
    for name in task_options:
        get_task(name)
    if not steerings:
        raise ActSteerError("give at least one steering (or None for the plain model)")
    if group_size is not None and group_size < 1:
        raise ActSteerError(f"group_size must be at least 1, got {group_size}")
    grids: dict[str, list[float]] = {}
    for name, steering in steerings.items():
        grid = strengths.get(name) if isinstance(strengths, Mapping) else strengths
        if steering is None:
            grid = [0.0]
        elif not grid:
            raise ActSteerError(f"no strengths given for steering {name!r}")
        else:
            steering.check_strength(list(grid))
        grids[name] = [float(s) for s in grid]

    model_name = model_name or getattr(model, "name_or_path", "") or type(model).__name__
    content = load_results(out) or {"format": FORMAT, "model": model_name, "entries": []}
    if content["model"] != model_name:
        raise ActSteerError(
            f"{out} holds results for model {content['model']!r}, not {model_name!r}; "
            "choose another output file"
        )
    content.setdefault("steerings", {})
    content.setdefault("metric_labels", {})
    for name, steering in steerings.items():
        content["steerings"][name] = {
            "plain": steering is None,
            "digest": steering_digest(steering),
            **(jsonable(describe_steering(steering)) or {}),
        }
    done = {
        _point_key(e["steering"], e["digest"], e["task"], e["options_key"], e["strength"])
        for e in content["entries"]
    }
    out.parent.mkdir(parents=True, exist_ok=True)

    # Plan the work: per task and steering, the λ values not yet in the file, in groups.
    plan = []
    for task_name, options in task_options.items():
        task = TASKS[task_name]
        key = options_key(options)
        for name, steering in steerings.items():
            digest = steering_digest(steering)
            todo = [
                s for s in grids[name] if _point_key(name, digest, task_name, key, s) not in done
            ]
            size = (group_size or len(todo) or 1) if task.generation else 1
            for i in range(0, len(todo), size):
                plan.append((task_name, key, name, steering, digest, todo[i : i + size]))

    bar = tqdm(total=sum(len(p[-1]) for p in plan), desc="sweep", disable=not progress)
    shared: dict[str, dict[str, Any]] = {}
    for index, (task_name, key, name, steering, digest, group) in enumerate(plan):
        task = TASKS[task_name]
        options = dict(task_options[task_name])
        options.update(shared.get(task_name, {}))
        if task_name == "concept" and "judge" not in options:
            options["judge"] = _calibrated_judge(options)  # once per sweep, not per group
            shared[task_name] = {"judge": options["judge"]}
        bar.set_postfix_str(f"{task_name} / {name}")
        started = time.perf_counter()
        options.setdefault("progress", progress)
        results = task.evaluate_grid(model, tokenizer, steering, group, **options)
        seconds = (time.perf_counter() - started) / len(group)
        for result in results:
            content["entries"].append(
                {
                    "steering": name,
                    "digest": digest,
                    "method": None if steering is None else steering.method,
                    "task": task_name,
                    "options_key": key,
                    "options": jsonable(task_options[task_name]),
                    "strength": float(result.strength),
                    "metrics": jsonable(result.metrics()),
                    "intervals": jsonable(result.intervals()),
                    "seconds": round(seconds, 3),
                    "result": jsonable(result),
                }
            )
        content["metric_labels"][task_name] = dict(task.result_type.METRICS)
        _write_json(out, content)
        bar.update(len(group))
        last_of_task = index + 1 == len(plan) or plan[index + 1][0] != task_name
        if plots and last_of_task:
            plot_sweep(content, out.parent, out.stem)
    bar.close()
    if plots and not plan and content["entries"]:
        plot_sweep(content, out.parent, out.stem)
    return content


def _calibrated_judge(options: Mapping[str, Any]) -> ConceptJudge:
    """The concept judge a concept task would calibrate, built once for the whole sweep."""
    from actsteer.evaluation.tasks.concept import ConceptJudge, data_source, load_concept_sentences

    concept = options.get("concept", "football")
    if options.get("calibration") is not None:
        (on, off), source = options["calibration"], "given sentences"
    else:
        resolved = data_source(options.get("data"))
        on, off = load_concept_sentences(concept, resolved)
        source = str(resolved)
    return ConceptJudge.calibrate(concept, on, off, options.get("description"), source=source)
