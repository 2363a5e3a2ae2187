"""Classifier-free guidance: which rows and which calls of a pipeline run are conditional.

Under classifier-free guidance (CFG) a denoiser's batch holds [unconditional; conditional]
halves, and each text encoder runs once for the prompts and once more for the negative
prompts. Recording keeps, and "conditional" steering moves, only the conditional half and only
the prompts' encoding, so guidance amplifies the transport. Both read it from one `Guidance`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from actsteer.tree import DENOISERS


class Guidance:
    """What hooks on a pipeline's tree need to know about the current call.

    `text_calls[name]`: how many times text encoder `name` ran since the denoiser last did (its
    first call encodes the prompts, a second one the negative prompts). `split`, set once per
    denoiser call: whether its batch is [unconditional; conditional] — the pipeline's
    `do_classifier_free_guidance` where it has one, else a batch of twice the prompts the text
    encoder saw (so with one image per prompt).
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.has_flag = hasattr(type(pipeline), "do_classifier_free_guidance")
        self.split = False
        self.text_calls: dict[str, int] = {}
        self.prompt_rows = 0

    def pre_hooks(self, tree: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Count text-encoder calls; a denoiser call starts a new count."""
        handles = []
        for name, component in tree.named_children():
            if name.startswith("text_encoder"):
                self.text_calls[name] = 0
                hook = partial(self._count, name)
                handles.append(component.register_forward_pre_hook(hook, with_kwargs=True))
            elif name in DENOISERS:
                handles.append(component.register_forward_pre_hook(self._reset, with_kwargs=True))
        return handles

    def negative_prompts(self, component: str) -> bool:
        """Whether text encoder `component` is now encoding the negative prompts."""
        return self.text_calls.get(component, 0) > 1

    def _count(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.text_calls[name] += 1
        ids = args[0] if args else kwargs.get("input_ids")
        if self.text_calls[name] == 1 and isinstance(ids, torch.Tensor):
            self.prompt_rows = ids.shape[0]

    def _reset(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.text_calls = dict.fromkeys(self.text_calls, 0)
        if self.has_flag:
            self.split = bool(getattr(self.pipeline, "do_classifier_free_guidance", False))
        else:  # the latents: the denoiser's first argument (UNets) or hidden_states (DiTs)
            latents = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            rows = latents.shape[0] if isinstance(latents, torch.Tensor) else 0
            self.split = rows == 2 * self.prompt_rows
