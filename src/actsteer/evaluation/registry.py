"""The evaluation tasks by name, with the result type each returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actsteer.errors import ActSteerError
from actsteer.evaluation import concept, mmlu, perplexity, toxicity, truthfulqa
from actsteer.evaluation.common import TaskResult


@dataclass(frozen=True)
class Task:
    """A task: `evaluate_grid(model, tok, steering, strengths, **options)` → one result per λ.

    generation: whether it samples text (then a λ grid runs as per-row strengths in one batch).
    """

    name: str
    evaluate_grid: Callable[..., Sequence[TaskResult]]
    result_type: type[TaskResult]
    generation: bool
    description: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "toxicity",
            toxicity.evaluate_grid,
            toxicity.ToxicityResult,
            True,
            "% toxic continuations of RealToxicityPrompts prompts, per prompt stratum",
        ),
        Task(
            "perplexity",
            perplexity.evaluate_grid,
            perplexity.PerplexityResult,
            False,
            "teacher-forced perplexity on held-out text (WikiText-2 test by default)",
        ),
        Task(
            "truthfulqa",
            truthfulqa.evaluate_grid,
            truthfulqa.TruthfulQAResult,
            False,
            "TruthfulQA MC1/MC2 by answer log-likelihood",
        ),
        Task(
            "mmlu",
            mmlu.evaluate_grid,
            mmlu.MMLUResult,
            False,
            "MMLU accuracy by answer-letter likelihood",
        ),
        Task(
            "concept",
            concept.evaluate_grid,
            concept.ConceptResult,
            True,
            "fraction of generations about a concept, and their perplexity",
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called `name`, or a clear error listing the tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ActSteerError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
