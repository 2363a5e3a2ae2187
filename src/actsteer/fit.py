"""`fit`: prompts → recorded activations → one map per module → a Steering.

Language models and diffusers pipelines take the same path: only the recording differs
(`capture.record` over texts, `diffusion.record_pipeline` over denoising runs); the estimation
and the description are shared.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm.auto import tqdm

from actsteer.capture import check_texts, record, resolve_modules, sample_cap, warn_truncated
from actsteer.chat import chat_texts
from actsteer.choices import DEFAULT_MODULES, MODES, POOLINGS, SUPPORTS
from actsteer.compat import model_fingerprint
from actsteer.diffusion import DENOISING, record_pipeline
from actsteer.errors import ActSteerError
from actsteer.lineas import Settings, fit_end_to_end
from actsteer.maps import AffineMap, support_bounds
from actsteer.methods import Method, get_method
from actsteer.sequential import SequentialFitter
from actsteer.steering import Steering, SteeringInfo
from actsteer.tree import PipelineModules, is_pipeline, model_name, module_tree

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def fit(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None = None,
    source: Sequence[str] | None = None,
    target: Sequence[str] | None = None,
    *,
    modules: str | Sequence[str] | None = None,
    method: str = "linear-act",
    mode: str = "independent",
    pooling: str | None = None,
    support: str | None = None,
    support_pooling: str | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    budget_mb: float = 1024,
    data: dict[str, Any] | None = None,
    progress: bool = True,
    pipeline_options: dict[str, Any] | None = None,
    steps: int | None = None,
    learning_rate: float | None = None,
    sparsity: float | None = None,
    seed: int | None = None,
    init: str | None = None,
    chat: bool = False,
) -> Steering:
    """Fit a steering that moves the model's activations on `source` texts onto `target`'s.

    modules: a preset ("attn-out" (default: the attention outputs, the strongest setting of the
      defaults study in docs/benchmarks.md), "post-attn-ln", "layernorms", "mlp-out",
      "residual"), a regex fully matching module names, or a list of names.
    mode: "independent" fits each module on the plain model's activations; "sequential" fits
      each on activations already transported by the maps of all upstream modules.
    pooling: how token activations become one sample per text: "mean" (real tokens only),
      "last", "max" or "all" (every token a sample, subsampled so the samples of both sets
      together stay within budget_mb);
      the method's default when None (mean for the AcT methods).
    support: the support the steering applies with by default (and, in sequential mode, the
      one upstream maps use while fitting); the method's default when None.
    support_pooling: the pooling of the source samples the support's bounds come from (None:
      the fit's own pooling). "all" estimates them from token activations while the map is
      fitted on pooled samples, so a q-support covers the tokens it is applied to (with mean
      pooling it holds only about half of them); independent mode, language models.
    data: a free description of the prompt sets, stored with the steering.
    A diffusers pipeline takes no tokenizer; pipeline_options (steps, guidance_scale, every,
    seed, batch_size, and any pipeline keyword such as height) go to its denoising runs, and
    `modules` defaults to "unet-norms" or, for transformer denoisers, "dit-blocks".
    method="lineas" trains the maps of all modules jointly through the model (mode
    "end-to-end"; language models only; see actsteer.lineas), 32 source texts per step, and
    these settings (None: its defaults, stored with the steering as
    info.data["training"]): steps (100), learning_rate (Adam, 0.02), sparsity (0 = no
    sparse-group-lasso penalty), seed (0), init ("identity" or "linear-act").
    chat: instruct models: each text is a user turn of the tokenizer's chat template, the
    assistant's turn opened (actsteer.chat); the template's tokens are pooled too.
    """
    if source is None or target is None:
        raise ActSteerError("fit needs both source= and target= texts")
    estimator = get_method(method)
    training: dict[str, Any] = dict(
        steps=steps, learning_rate=learning_rate, sparsity=sparsity, seed=seed, init=init
    )
    given = [f"{key}=" for key, value in training.items() if value is not None]
    if given and not estimator.trained:
        raise ActSteerError(
            f"{', '.join(given)} only apply to methods trained end to end (lineas); method "
            f"{method!r} is estimated in closed form: drop them or use method='lineas'"
        )
    if estimator.trained and mode not in ("independent", "end-to-end"):
        raise ActSteerError(
            f"method {method!r} trains all maps jointly (mode 'end-to-end'); mode {mode!r} does "
            "not apply to it"
        )
    if not estimator.trained and mode not in MODES:
        raise ActSteerError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    settings = Settings.resolve(**training) if estimator.trained else None
    if support_pooling is not None and support_pooling not in POOLINGS:
        raise ActSteerError(
            f"unknown support_pooling {support_pooling!r}; choose one of {', '.join(POOLINGS)}"
        )
    if support_pooling is not None and (mode != "independent" or estimator.trained):
        raise ActSteerError(
            "support_pooling applies to independent fits (the sequential and end-to-end fits "
            "use the support while fitting): drop it or use mode='independent'"
        )
    support = support or estimator.default_support
    if support not in SUPPORTS:
        raise ActSteerError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
    pipeline = is_pipeline(model)
    if pipeline and settings is not None:
        raise ActSteerError(f"method {method!r} is for language models, not pipelines")
    if pipeline and support_pooling is not None:
        raise ActSteerError("support_pooling is for language models, not pipelines")
    if pipeline and (mode != "independent" or tokenizer is not None):
        raise ActSteerError(
            "text-to-image pipelines are fitted in independent mode and bring their own "
            "tokenizer: call fit(pipe, source=..., target=...)"
        )
    if not pipeline and tokenizer is None:
        raise ActSteerError("fit needs the model's tokenizer: fit(model, tokenizer, source=...)")
    source = check_texts(source, "source", estimator.min_samples)
    target = check_texts(target, "target", estimator.min_samples)
    if chat:
        if tokenizer is None:
            raise ActSteerError("chat=True formats texts with a language model's tokenizer")
        source, target = chat_texts(tokenizer, source), chat_texts(tokenizer, target)
        data = {**(data or {}), "chat": True}
    units = getattr(getattr(model, "config", None), "hidden_size", 0)
    little = estimator.small_data(len(source), len(target), units)
    if little:
        warnings.warn(f"actsteer: little data for {method}: {little}", stacklevel=2)
    info = SteeringInfo(
        method=method,
        mode="end-to-end" if settings is not None else mode,
        support=support,
        data={**(data or {}), "source_texts": len(source), "target_texts": len(target)},
    )
    if pipeline:
        tree = cast(PipelineModules, module_tree(model))  # a pipeline's components
        names = resolve_modules(tree, modules or ("unet-norms" if "unet" in tree else "dit-blocks"))
        denoising = {**DENOISING, **(pipeline_options or {})}
        recorded = {
            what: record_pipeline(model, texts, names, desc=what, progress=progress, **denoising)
            for what, texts in (("target", target), ("source", source))
        }
        maps = estimate(estimator, names, recorded["source"], recorded["target"], progress)
        info.pooling = "mean"
        info.denoising = {k: v for k, v in denoising.items() if k != "batch_size"}
    else:
        tree = model
        names = resolve_modules(model, modules or DEFAULT_MODULES)
        info.pooling = pooling or estimator.default_pooling
        info.max_length = max_length
        if support_pooling not in (None, info.pooling):
            info.support_pooling = support_pooling
        assert tokenizer is not None  # refused above for a language model
        for what, texts in (("source", source), ("target", target)):
            warn_truncated(tokenizer, texts, max_length, what)
        if settings is not None:
            maps = fit_end_to_end(
                model, tokenizer, source, target, names, info, settings,
                batch_size=batch_size, budget_mb=budget_mb, progress=progress,
            )  # fmt: skip
        else:
            maps = _fit_language_model(
                model, tokenizer, source, target, names, estimator, info,
                batch_size=batch_size, budget_mb=budget_mb, progress=progress,
            )  # fmt: skip
    info.model_name = model_name(tree)
    info.fingerprint = model_fingerprint(tree)
    return Steering(maps, info)


def estimate(
    estimator: Method,
    names: Sequence[str],
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    progress: bool = True,
) -> dict[str, AffineMap]:
    """One map per module from its recorded source and target samples."""
    return {
        name: estimator.fit(source[name], target[name], what=f"activations of {name!r}")
        for name in tqdm(names, desc="fitting", disable=not progress, leave=False)
    }


def _fit_language_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    source: list[str],
    target: list[str],
    names: list[str],
    estimator: Method,
    info: SteeringInfo,
    *,
    batch_size: int,
    budget_mb: float,
    progress: bool,
) -> dict[str, AffineMap]:
    """Record a causal LM's activations on both sets (in sequential mode: carried through the
    maps of the upstream modules) and estimate the maps."""
    assert info.pooling is not None and info.max_length is not None and info.support is not None
    settings: dict[str, Any] = dict(
        pooling=info.pooling,
        batch_size=batch_size,
        max_length=info.max_length,
        budget_mb=budget_mb / 2,  # half for the source samples, half for the target's
        progress=progress,
    )
    if info.mode == "independent":
        target_samples = record(model, tokenizer, target, names, desc="target", **settings)
        source_samples = record(model, tokenizer, source, names, desc="source", **settings)
        maps = estimate(estimator, names, source_samples, target_samples, progress)
        if info.support_pooling is not None:
            settings["pooling"] = info.support_pooling
            del source_samples
            support = record(model, tokenizer, source, names, desc="support", **settings)
            for name in names:
                maps[name].bounds = support_bounds(support[name])
        return maps

    def fit_module(name: str, source: torch.Tensor, target: torch.Tensor) -> AffineMap:
        return estimator.fit(source, target, what=f"activations of {name!r}")

    width = getattr(model.config, "hidden_size", 1024)
    return SequentialFitter(
        model,
        tokenizer,
        source,
        target,
        fit_module,
        method=info.method,
        pooling=info.pooling,
        support=info.support,
        batch_size=batch_size,
        max_length=info.max_length,
        cap=sample_cap(info.pooling, len(names), width, budget_mb / 2),
        progress=progress,
    ).run(names)
