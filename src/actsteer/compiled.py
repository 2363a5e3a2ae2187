"""Steering a compiled model: hooks that torch.compile traces, and compiled code kept honest.

torch.compile does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`,
on by default): code traced without steering hooks keeps running without them after they are
added — the steering silently does nothing — and code traced with them keeps steering after
they are removed. The ways a model gets compiled code: `model.forward = torch.compile(...)`,
`model.compile()`, and transformers' own generation with a static cache on an accelerator
(`generate` compiles `model.__call__` once and keeps it in `model._compiled_call`).

So a steering applied to a model with compiled code runs in "traced" mode (actsteer.hooks): its
hooks are registered once, stay registered at λ = 0 (the transport is then the identity, bit for
bit), are plain torch ops, and read λ from a tensor updated in place — changing λ never
recompiles. A handle whose model gains compiled code while applied (transformers compiles at the
first `generate` with a static cache) switches to traced hooks at its next `set_strength`.
Switching to traced hooks and removing a steering from a model with compiled code reset torch's
compiled code (`torch.compiler.reset()`, for every model in the process), so the next call
traces the model as it now is: a recompilation when a steering comes or goes, none when λ
changes. Traced hooks take positions "all" and token gates; what else needs Python state per
pass (positions, context and prompt gates, guidance halves) is refused on a compiled model.
"""

from __future__ import annotations

import torch
from torch import nn


def has_compiled_code(model: nn.Module) -> bool:
    """Whether `model` runs compiled code: a compiled forward, `model.compile()`,
    transformers' compiled generation (`_compiled_call`), or a torch.compile wrapper."""
    return (
        hasattr(model.forward, "_torchdynamo_orig_callable")
        or getattr(model, "_compiled_call_impl", None) is not None
        or getattr(model, "_compiled_call", None) is not None
        or hasattr(model, "_orig_mod")
    )


def forget_compiled_code(model: nn.Module) -> None:
    """Reset torch's compiled code where `model` has some, so that its next call traces the
    hooks it has now (see the module)."""
    if has_compiled_code(model):
        torch.compiler.reset()
