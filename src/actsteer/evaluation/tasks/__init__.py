"""Evaluation tasks: each turns a model (and a steering at one or more strengths) into a typed
result.

Every task is one module in this package that registers itself (`register(Task(...))`); the
package imports all its modules, so adding a task is adding one file here. `TASKS`, `get_task`
and `evaluate` are the registry that `actsteer eval`, `actsteer sweep` and `run_sweep` read.
"""

import importlib
import pkgutil

from actsteer.evaluation.tasks.registry import TASKS, Task, evaluate, get_task, register

#: The tasks that ship with actsteer, in the order commands list them; any other module of the
#: package (a task a user added) follows, by name.
BUILT_IN = ("toxicity", "perplexity", "truthfulqa", "mmlu", "concept")
_added = sorted({m.name for m in pkgutil.iter_modules(__path__)} - {*BUILT_IN, "registry"})
for _name in (*BUILT_IN, *_added):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["TASKS", "Task", "evaluate", "get_task", "register"]
