"""The registry of evaluation tasks, the contract each fulfils, and the one `evaluate` entry.

Every task is one module of this package that registers itself (`register(Task(...))`); the
package imports all its modules, so adding a task is adding one file here. `actsteer eval` and
`actsteer sweep` find it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actsteer.errors import ActSteerError

if TYPE_CHECKING:
    from actsteer.evaluation.common import TaskResult
    from actsteer.steering import Steering


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


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry under its name."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called `name`, or a clear error listing the tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ActSteerError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def evaluate(
    task: str,
    model: Any,
    tokenizer: Any,
    steering: Steering | None = None,
    strength: float | None = None,
    **options: Any,
) -> TaskResult:
    """Task `task` at one strength (None: the steering's default); options as for the task's
    `evaluate_grid`."""
    return get_task(task).evaluate_grid(model, tokenizer, steering, strength, **options)[0]
