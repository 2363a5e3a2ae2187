"""diffusers text-to-image pipelines: loading, their modules as one tree, capture, image grids.

A pipeline's torch components (unet or transformer, text encoders, vae) are seen as one module
tree (`unet.down_blocks.0.resnets.0.norm1`, `text_encoder.text_model…`), so module selection,
artifacts and hooks work exactly as for language models. Differences handled here:

- 4-D convolution outputs (B, C, H, W) are pooled over H×W; their maps act per channel.
- Under classifier-free guidance the denoiser sees [unconditional; conditional] halves: only the
  conditional half is recorded, and by default only the conditional half is steered (and only
  the prompts' text encoding, not the negative prompts'), so guidance amplifies the transport;
  `cfg="both"` steers both halves alike.
- Samples are recorded across denoising steps (every `every`-th step), with a fixed seed per
  prompt index so source and target runs start from the same noise.
- Text encoders run once for the prompts and once for the negative prompts: only their first
  call per pipeline run (the prompts) is recorded.
- Dual-stream transformer blocks (Flux, SD3, …) return (text stream, image stream): the image
  stream is recorded and steered (`capture.TEXT_FIRST_BLOCKS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.capture import (
    HookedBuffers,
    check_texts,
    output_tensor,
    resolve_modules,
    stream_index,
)
from actsteer.errors import ActSteerError
from actsteer.methods import get_method
from actsteer.steer import Steering

PIPELINE_MODEL_TYPE = "diffusers-pipeline"


def is_pipeline(obj: object) -> bool:
    """A diffusers pipeline (checked by class name, so diffusers is imported only when used)."""
    return any(cls.__name__ == "DiffusionPipeline" for cls in type(obj).__mro__)


class PipelineModules(nn.ModuleDict):
    """A pipeline's torch components as one module tree; hooks on it act on the pipeline."""

    def __init__(self, pipe: Any) -> None:
        components = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
        super().__init__(components)
        self.config = SimpleNamespace(model_type=PIPELINE_MODEL_TYPE)
        self.name_or_path = getattr(pipe, "name_or_path", "") or type(pipe).__name__


def module_tree(model: Any) -> nn.Module:
    """The module tree to steer: the model itself, or a pipeline's components together."""
    return PipelineModules(model) if is_pipeline(model) else model


def load_pipeline(
    name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """Load any diffusers text-to-image pipeline: a hub id or a local folder."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise ActSteerError(f"could not load pipeline {name!r}: {err}") from None
    return pipe.to(device)


def _pool(a: torch.Tensor) -> torch.Tensor:
    """One sample per batch row: mean over H×W (conv maps) or over tokens (sequences)."""
    if a.ndim == 4:
        return a.mean(dim=(2, 3))
    if a.ndim == 3:
        return a.mean(dim=1)
    if a.ndim == 2:
        return a
    raise ActSteerError(f"cannot pool a module output of shape {tuple(a.shape)}")


class PipelineRecorder(HookedBuffers):
    """Pools each module's output per prompt, conditional half only, every k-th call."""

    def __init__(self, tree: nn.Module, modules: Sequence[str], every: int, seed: int = 0):
        self.every = every
        self.rows = 0
        self.calls = dict.fromkeys(modules, 0)
        lookup = dict(tree.named_modules())
        self.streams = {name: stream_index(lookup[name]) for name in modules}
        super().__init__(tree, modules, None, seed)

    def start_run(self, rows: int) -> None:
        """Before each pipeline call: its number of prompts; resets the step counters."""
        self.rows = rows
        self.calls = dict.fromkeys(self.calls, 0)

    def _hook(self, name: str):
        text_encoder = name.startswith("text_encoder")

        def hook(module: nn.Module, args: object, output: object) -> None:
            call = self.calls[name]
            self.calls[name] += 1
            if (text_encoder and call > 0) or call % self.every:
                return
            a = output_tensor(output, self.streams[name])
            if a.shape[0] == 2 * self.rows:  # classifier-free guidance: keep the conditional half
                a = a[self.rows :]
            self.buffers[name].add(_pool(a))

        return hook


def _generators(start: int, count: int, seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per prompt, seeded by the prompt's index: comparable source/target runs."""
    return [torch.Generator(device).manual_seed(seed + start + i) for i in range(count)]


def record_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    modules: Sequence[str],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    every: int = 2,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "recording",
    **pipe_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Pooled activations {module: (prompts × recorded steps, units)} over denoising runs."""
    prompts = check_texts(prompts, desc, minimum=1)
    tree = module_tree(pipe)
    recorder = PipelineRecorder(tree, modules, every, seed)
    device = next(tree.parameters()).device
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in tqdm(
            range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False
        ):
            batch = list(prompts[start : start + batch_size])
            recorder.start_run(len(batch))
            with torch.inference_mode():
                pipe(
                    prompt=batch,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=_generators(start, len(batch), seed, device),
                    output_type="latent",
                    **pipe_kwargs,
                )
    finally:
        recorder.remove()
    return recorder.samples()


def fit_pipeline(
    pipe: Any,
    source: Sequence[str],
    target: Sequence[str],
    *,
    modules: str | Sequence[str] | None = None,
    method: str = "linear-act",
    support: str | None = None,
    steps: int = 20,
    guidance_scale: float = 5.0,
    every: int = 2,
    seed: int = 0,
    batch_size: int = 8,
    data: dict[str, Any] | None = None,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> Steering:
    """Fit a steering of a text-to-image pipeline from source and target prompts.

    pipe_kwargs (height, width, negative_prompt, …) go to every pipeline call.

    modules defaults to every UNet norm ("unet-norms", as in the paper) or, for transformer
    denoisers, every block output ("dit-blocks").
    """
    from actsteer.artifact import model_fingerprint

    estimator = get_method(method)
    source = check_texts(source, "source", estimator.min_samples)
    target = check_texts(target, "target", estimator.min_samples)
    tree = module_tree(pipe)
    names = resolve_modules(tree, modules or ("unet-norms" if "unet" in tree else "dit-blocks"))
    settings = dict(
        steps=steps, guidance_scale=guidance_scale, every=every, seed=seed,
        batch_size=batch_size, progress=progress, **pipe_kwargs,
    )  # fmt: skip
    target_samples = record_pipeline(pipe, target, names, desc="target", **settings)
    source_samples = record_pipeline(pipe, source, names, desc="source", **settings)
    maps = {
        name: estimator.fit(
            source_samples[name], target_samples[name], what=f"activations of {name!r}"
        )
        for name in names
    }
    info = {
        "method": method,
        "mode": "independent",
        "pooling": "mean",
        "support": support or estimator.default_support,
        "default_strength": 1.0,
        "model": {"name": tree.name_or_path, "fingerprint": model_fingerprint(tree)},
        "denoising": {
            "steps": steps,
            "guidance_scale": guidance_scale,
            "every": every,
            "seed": seed,
            **pipe_kwargs,
        },  # fmt: skip
        "data": {**(data or {}), "source_texts": len(source), "target_texts": len(target)},
    }
    return Steering(maps, info)


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    strengths: Sequence[float],
    steering: Steering | None = None,
    *,
    support: str | None = None,
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    cfg: str = "conditional",
    **pipe_kwargs: Any,
) -> list[list[Any]]:
    """images[p][s]: prompt p at strength s, one pipeline call with a per-row strength.

    Every strength of a prompt starts from the same noise (seed + prompt index), so the columns
    differ only by the steering. cfg: which classifier-free-guidance half is steered
    (`Steering.applied`).
    """
    prompts, strengths = list(prompts), [float(s) for s in strengths]
    rows = [p for p in prompts for _ in strengths]
    device = next(module_tree(pipe).parameters()).device
    generators = [
        torch.Generator(device).manual_seed(seed + i)
        for i in range(len(prompts))
        for _ in strengths
    ]
    lam = torch.tensor(strengths, dtype=torch.float32).repeat(len(prompts))
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        if steering is None:
            images = pipe(prompt=rows, num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators, **pipe_kwargs).images  # fmt: skip
        else:
            with steering.applied(pipe, lam, support, cfg=cfg):
                images = pipe(prompt=rows, num_inference_steps=steps, guidance_scale=guidance_scale,
                              generator=generators, **pipe_kwargs).images  # fmt: skip
    n = len(strengths)
    return [images[p * n : (p + 1) * n] for p in range(len(prompts))]


def image_grid(
    images: Sequence[Sequence[Any]], prompts: Sequence[str], strengths: Sequence[float]
) -> Any:
    """One labelled PNG-ready grid: rows prompts, columns λ."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = images[0][0].size
    label_w, header_h = 220, 24
    grid = Image.new("RGB", (label_w + cell_w * len(strengths), header_h + cell_h * len(prompts)))
    grid.paste((255, 255, 255), (0, 0, grid.width, grid.height))
    draw = ImageDraw.Draw(grid)
    for s, lam in enumerate(strengths):
        draw.text((label_w + s * cell_w + 4, 6), f"λ = {lam:g}", fill=(0, 0, 0))
    for p, prompt in enumerate(prompts):
        y = header_h + p * cell_h
        words, lines = prompt.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) > 32:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((4, y + 4), "\n".join(lines), fill=(0, 0, 0))
        for s, image in enumerate(images[p]):
            grid.paste(image, (label_w + s * cell_w, y))
    return grid
