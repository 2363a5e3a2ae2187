"""`fit`: prompts → recorded activations → one map per module → a Steering.

Language models and diffusers pipelines take the same path: only the recording differs
(`capture.record` over texts, `diffusion.record_pipeline` over denoising runs); the estimation
and the description are shared. The mode (actsteer.modes) says how: each module alone
(Independent), with upstream maps applied (Sequential), all maps trained jointly (EndToEnd) or
over a pipeline's denoising runs (Denoising); the method says which modes it takes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm.auto import tqdm

from actsteer.capture import check_texts, record, resolve_modules, sample_cap, warn_truncated
from actsteer.chat import chat_texts
from actsteer.choices import DEFAULT_MODULES, POOLINGS, SUPPORTS, check_choice
from actsteer.compat import model_fingerprint
from actsteer.diffusion import record_pipeline
from actsteer.errors import ActSteerError
from actsteer.gates import Gate, GateSettings
from actsteer.maps import UnitMap, support_bounds
from actsteer.methods import Method, get_method
from actsteer.modes import (
    Denoising,
    EndToEnd,
    FitMode,
    Independent,
    Sequential,
    from_old_keywords,
    given_fields,
    resolve_mode,
)
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
    method: str = "linear-act",
    modules: str | Sequence[str] | None = None,
    mode: str | FitMode | None = None,
    pooling: str | None = None,
    support: str | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    budget_mb: float = 1024,
    data: dict[str, Any] | None = None,
    chat: bool = False,
    gate: str | GateSettings | None = None,
    progress: bool = True,
    pipeline_options: dict[str, Any] | None = None,
    **old_keywords: Any,
) -> Steering:
    """Fit a steering that moves the model's activations on `source` texts onto `target`'s.

    method: the estimator (`actsteer methods`); it says which modes it can be fitted in.
    modules: a preset ("attn-out" (default: the attention outputs, the strongest setting of the
      defaults study in docs/benchmarks.md), "post-attn-ln", "layernorms", "mlp-out",
      "residual"), a regex fully matching module names, or a list of names. A diffusers
      pipeline defaults to "unet-norms" or, for transformer denoisers, "dit-blocks".
    mode: how the maps are fitted (actsteer.modes): a name for the defaults, or settings —
      Independent(support_pooling=...), Sequential(), EndToEnd(training_steps=...,
      learning_rate=..., sparsity=..., seed=..., init=...) (LinEAS), Denoising(
      denoising_steps=..., guidance_scale=..., every=..., seed=..., batch_size=...,
      options={...}) (pipelines). None: the method's default for the model.
    pooling: how token activations become one sample per text: "mean" (real tokens only),
      "last", "max" or "all" (every token a sample, subsampled so the samples of both sets
      together stay within budget_mb); the method's default when None (mean for the AcT
      methods).
    support: the support the steering applies with by default (and, sequentially or end to
      end, the one the maps use while fitting); the method's default when None.
    data: a free description of the prompt sets, stored with the steering.
    chat: instruct models: each text is a user turn of the tokenizer's chat template, the
      assistant's turn opened (actsteer.chat); the template's tokens are pooled too.
    gate: a gate per module on top of the maps (actsteer.gates): "token", "context" or
      "prompt" (or GateSettings with a threshold and temperature), fitted on the token
      activations of the same texts — trained with the maps for LinEAS
      (actsteer.trained_gates); language models only. Calibrate a gated steering.
    A diffusers pipeline takes no tokenizer. The keywords before modes (steps=,
    learning_rate=, sparsity=, seed=, init=, support_pooling=, pipeline_options=) still work,
    with a DeprecationWarning, until the next release.
    """
    if source is None or target is None:
        raise ActSteerError("fit needs both source= and target= texts")
    estimator = get_method(method)
    pipeline = is_pipeline(model)
    settings = _mode_settings(estimator, mode, from_old_keywords(old_keywords, pipeline_options))
    if settings is None:
        settings = Denoising() if pipeline else resolve_mode(estimator.modes[0])
    _check_mode(estimator, settings, pipeline)
    check_choice(pooling, POOLINGS, "pooling")
    support = support or estimator.default_support
    check_choice(support, SUPPORTS, "support")
    if not pipeline and tokenizer is None:
        raise ActSteerError("fit needs the model's tokenizer: fit(model, tokenizer, source=...)")
    if pipeline and tokenizer is not None:
        raise ActSteerError(
            "text-to-image pipelines bring their own tokenizer: call "
            "fit(pipe, source=..., target=...)"
        )
    source = check_texts(source, "source", estimator.min_samples)
    target = check_texts(target, "target", estimator.min_samples)
    if sorted(source) == sorted(target):
        raise ActSteerError(
            "source and target are the same texts: a steering between them moves nothing; give "
            "target texts that differ from the source in the property to steer"
        )
    if chat:
        if tokenizer is None:
            raise ActSteerError("chat=True formats texts with a language model's tokenizer")
        source, target = chat_texts(tokenizer, source), chat_texts(tokenizer, target)
        data = {**(data or {}), "chat": True}
    units = getattr(getattr(model, "config", None), "hidden_size", 0)
    little = estimator.small_data(len(source), len(target), units)
    if little:
        warnings.warn(f"actsteer: little data for {method}: {little}", stacklevel=2)
    if gate is not None and pipeline:
        raise ActSteerError("gates are for language models; fit the pipeline without gate=")
    gating = gate if isinstance(gate, GateSettings) or gate is None else GateSettings(gate)
    gates: dict[str, Gate] = {}
    info = SteeringInfo(
        method=method,
        mode=settings.name,
        support=support,
        data={**(data or {}), "source_texts": len(source), "target_texts": len(target)},
    )
    if isinstance(settings, Denoising):
        tree = cast(PipelineModules, module_tree(model))  # a pipeline's components
        default = "unet-norms" if "unet" in tree else "dit-blocks"
        names = resolve_modules(tree, default if modules is None else modules)
        recorded = {
            what: record_pipeline(
                model, texts, names, desc=what, progress=progress, **settings.recording()
            )
            for what, texts in (("target", target), ("source", source))
        }
        maps = estimate(estimator, names, recorded["source"], recorded["target"], progress)
        info.pooling = "mean"
        info.denoising = settings.description()
    else:
        tree = model
        names = resolve_modules(model, DEFAULT_MODULES if modules is None else modules)
        info.pooling = pooling or estimator.default_pooling
        info.max_length = max_length
        assert tokenizer is not None  # refused above for a language model
        for what, texts in (("source", source), ("target", target)):
            warn_truncated(tokenizer, texts, max_length, what)
        common: dict[str, Any] = dict(batch_size=batch_size, budget_mb=budget_mb, progress=progress)
        if isinstance(settings, EndToEnd):
            maps, gates = estimator.trainer()(
                model, tokenizer, source, target, names, info, settings, **common,
                gating=gating,
            )  # fmt: skip
        else:
            maps = _fit_language_model(
                model, tokenizer, source, target, names, estimator, info, settings, **common
            )
    info.model_name = model_name(tree)
    info.fingerprint = model_fingerprint(tree)
    steering = Steering(maps, info, gates=gates)
    if gating is None or gates:  # ungated, or gated while training
        return steering
    return steering.with_gate(
        model, tokenizer, source, target, gating.kind, threshold=gating.threshold,
        temperature=gating.temperature, max_length=max_length, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip


def _mode_settings(
    estimator: Method, mode: str | FitMode | None, old: FitMode | None
) -> FitMode | None:
    """The mode's settings from `mode` or the old keywords (not both); None: the default."""
    if old is not None and mode is not None:
        raise ActSteerError(
            f"give the mode's settings once: mode={mode!r} and the old keywords "
            f"({given_fields(old)}) both set them; use mode= alone"
        )
    if old is not None:
        return old
    return None if mode is None else resolve_mode(mode)


def _check_mode(estimator: Method, settings: FitMode, pipeline: bool) -> None:
    """Refuse a mode the method, or the kind of model, cannot be fitted in, saying why."""
    if isinstance(settings, EndToEnd) and settings.name not in estimator.modes:
        raise ActSteerError(
            f"{given_fields(settings)} only apply to methods trained end to end (lineas); "
            f"method {estimator.name!r} is estimated in closed form: drop them or use "
            "method='lineas'"
        )
    if pipeline and Denoising.name not in estimator.modes:
        raise ActSteerError(f"method {estimator.name!r} is for language models, not pipelines")
    if settings.name not in estimator.modes:
        raise ActSteerError(
            f"method {estimator.name!r} is fitted in mode {estimator.modes[0]!r}; mode "
            f"{settings.name!r} does not apply to it"
        )
    if pipeline and not isinstance(settings, Denoising):
        raise ActSteerError(
            "text-to-image pipelines are fitted over denoising runs (mode=Denoising(...)) "
            f"and bring their own tokenizer, not in mode {settings.name!r}: call "
            "fit(pipe, source=..., target=..., mode=Denoising(...))"
        )
    if not pipeline and isinstance(settings, Denoising):
        raise ActSteerError("mode 'denoising' is for diffusers pipelines, not language models")


def estimate(
    estimator: Method,
    names: Sequence[str],
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    progress: bool = True,
) -> dict[str, UnitMap]:
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
    settings: Independent | Sequential,
    *,
    batch_size: int,
    budget_mb: float,
    progress: bool,
) -> dict[str, UnitMap]:
    """Record a causal LM's activations on both sets (sequentially: carried through the maps
    of the upstream modules) and estimate the maps."""
    assert info.pooling is not None and info.max_length is not None and info.support is not None
    recording: dict[str, Any] = dict(
        pooling=info.pooling,
        batch_size=batch_size,
        max_length=info.max_length,
        budget_mb=budget_mb / 2,  # half for the source samples, half for the target's
        progress=progress,
    )
    if isinstance(settings, Independent):
        target_samples = record(model, tokenizer, target, names, desc="target", **recording)
        source_samples = record(model, tokenizer, source, names, desc="source", **recording)
        maps = estimate(estimator, names, source_samples, target_samples, progress)
        if settings.support_pooling not in (None, info.pooling):
            info.support_pooling = recording["pooling"] = settings.support_pooling
            del source_samples
            support = record(model, tokenizer, source, names, desc="support", **recording)
            for name in names:
                maps[name].bounds = support_bounds(support[name])
        return maps

    def fit_module(name: str, source: torch.Tensor, target: torch.Tensor) -> UnitMap:
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
