"""`fit`: prompts → recorded activations → one map per module → a Steering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.artifact import model_fingerprint
from actsteer.capture import check_texts, record, resolve_modules, sample_cap
from actsteer.diffusion import fit_pipeline, is_pipeline
from actsteer.errors import ActSteerError
from actsteer.maps import SUPPORTS, AffineMap
from actsteer.methods import get_method
from actsteer.sequential import SequentialFitter
from actsteer.steer import Steering

MODES = ("independent", "sequential")


def fit(
    model: nn.Module,
    tokenizer=None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    *,
    modules: str | Sequence[str] | None = None,
    method: str = "linear-act",
    mode: str = "independent",
    pooling: str | None = None,
    support: str | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    budget_mb: float = 1024,
    data: dict[str, Any] | None = None,
    progress: bool = True,
    pipeline_options: dict[str, Any] | None = None,
) -> Steering:
    """Fit a steering that moves the model's activations on `source` texts onto `target`'s.

    modules: a preset ("post-attn-ln" (default), "layernorms", "attn-out", "mlp-out"), a regex
      fully matching module names, or a list of names.
    mode: "independent" fits each module on the plain model's activations; "sequential" fits
      each on activations already transported by the maps of all upstream modules.
    pooling: how token activations become one sample per text: "mean" (real tokens only),
      "last", "max" or "all" (every token a sample, subsampled so the samples of both sets
      together stay within budget_mb);
      the method's default when None (mean for the AcT methods).
    support: the support the steering applies with by default (and, in sequential mode, the
      one upstream maps use while fitting); the method's default when None.
    data: a free description of the prompt sets, stored with the steering.
    A diffusers pipeline takes no tokenizer; pipeline_options go to `diffusion.fit_pipeline`
    (steps, guidance_scale, every, seed, batch_size) and `modules` defaults to its presets.
    """
    if source is None or target is None:
        raise ActSteerError("fit needs both source= and target= texts")
    if is_pipeline(model):
        if mode != "independent" or tokenizer is not None:
            raise ActSteerError(
                "text-to-image pipelines are fitted in independent mode and bring their own "
                "tokenizer: call fit(pipe, source=..., target=...)"
            )
        return fit_pipeline(
            model, source, target, modules=modules, method=method, support=support,
            data=data, progress=progress, **(pipeline_options or {}),
        )  # fmt: skip
    if tokenizer is None:
        raise ActSteerError("fit needs the model's tokenizer: fit(model, tokenizer, source=...)")
    estimator = get_method(method)
    if mode not in MODES:
        raise ActSteerError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    support = support or estimator.default_support
    pooling = pooling or estimator.default_pooling
    if support not in SUPPORTS:
        raise ActSteerError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
    source = check_texts(source, "source", estimator.min_samples)
    target = check_texts(target, "target", estimator.min_samples)
    names = resolve_modules(model, modules or "post-attn-ln")
    settings = dict(
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        budget_mb=budget_mb / 2,  # half for the source samples, half for the target's
        progress=progress,
    )
    target_samples = record(model, tokenizer, target, names, desc="target", **settings)

    def fit_module(name: str, source_samples: torch.Tensor) -> AffineMap:
        return estimator.fit(source_samples, target_samples[name], what=f"activations of {name!r}")

    if mode == "independent":
        source_samples = record(model, tokenizer, source, names, desc="source", **settings)
        maps = {
            name: fit_module(name, source_samples[name])
            for name in tqdm(names, desc="fitting", disable=not progress, leave=False)
        }
    else:
        width = getattr(model.config, "hidden_size", 1024)
        maps = SequentialFitter(
            model,
            tokenizer,
            source,
            fit_module,
            method=method,
            pooling=pooling,
            support=support,
            batch_size=batch_size,
            max_length=max_length,
            cap=sample_cap(pooling, len(names), width, budget_mb / 2),
            progress=progress,
        ).run(names)
    info = {
        "method": method,
        "mode": mode,
        "pooling": pooling,
        "support": support,
        "max_length": max_length,
        "default_strength": 1.0,
        "model": {
            "name": getattr(model, "name_or_path", "") or type(model).__name__,
            "fingerprint": model_fingerprint(model),
        },
        "data": {**(data or {}), "source_texts": len(source), "target_texts": len(target)},
    }
    return Steering(maps, info)
