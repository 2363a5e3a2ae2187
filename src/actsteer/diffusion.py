"""diffusers text-to-image pipelines: loading, recording their activations, image grids.

A pipeline is steered through the same path as a language model: its components form one module
tree (`actsteer.tree`), `actsteer.fit` estimates its maps with the same methods, and the same
hooks apply them. What differs is handled here and in `actsteer.guidance`:

- 4-D convolution outputs (B, C, H, W) are pooled over H×W; their maps act per channel.
- Under classifier-free guidance the denoiser sees [unconditional; conditional] halves: only the
  conditional half is recorded, and by default only the conditional half is steered (and only
  the prompts' text encoding, not the negative prompts'), so guidance amplifies the transport;
  `guidance="both"` steers both halves alike. `actsteer.guidance` decides it for both.
- Samples are recorded across denoising steps (every `every`-th step), with a fixed seed per
  prompt index so source and target runs start from the same noise.
- Dual-stream transformer blocks (Flux, SD3, …) return (text stream, image stream): the image
  stream is recorded and steered (`tree.TEXT_FIRST_BLOCKS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.capture import HookedBuffers, check_texts
from actsteer.deprecation import warn_renamed
from actsteer.errors import ActSteerError
from actsteer.extras import require
from actsteer.guidance import Guidance
from actsteer.placement import resolve_device, resolve_dtype
from actsteer.steering import Steering
from actsteer.tree import DENOISERS, module_tree, output_tensor, stream_index


#: The denoising settings a pipeline fit records under, and their defaults.
def load_pipeline(
    name: str, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """Load any diffusers text-to-image pipeline: a hub id or a local folder.

    dtype and device as for `actsteer.load_model`; device "auto" places the pipeline's
    components across the GPUs there are (diffusers' device_map="balanced"), or on the CPU
    on a machine without one."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    diffusers = require("diffusers", "diffusion", "loading a text-to-image pipeline")
    balanced = device == "auto" and torch.cuda.is_available()
    placement = {"device_map": "balanced"} if balanced else {}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(name, torch_dtype=dtype, **placement)
    except (OSError, ValueError) as err:
        raise ActSteerError(f"could not load pipeline {name!r}: {err}") from None
    return pipe if balanced else pipe.to("cpu" if device == "auto" else device)


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
    """Pools each module's output per prompt, conditional half only, every k-th call.

    Which calls and rows are conditional comes from the pipeline's `Guidance`, as for hooks.
    """

    def __init__(self, pipe: Any, tree: nn.Module, modules: Sequence[str], every: int) -> None:
        self.every = every
        self.calls = dict.fromkeys(modules, 0)
        self.guidance = Guidance(pipe)
        lookup = dict(tree.named_modules())
        self.streams = {name: stream_index(lookup[name]) for name in modules}
        super().__init__(tree, modules, None)
        self.handles += self.guidance.pre_hooks(tree)

    def start_run(self) -> None:
        """Before each pipeline call: resets the step counters."""
        self.calls = dict.fromkeys(self.calls, 0)

    def _hook(self, name: str):
        component = name.split(".", 1)[0]
        denoiser = component in DENOISERS

        def hook(module: nn.Module, args: object, output: object) -> None:
            call = self.calls[name]
            self.calls[name] += 1
            if self.guidance.negative_prompts(component) or call % self.every:
                return
            a = output_tensor(output, self.streams[name])
            if denoiser and self.guidance.split:  # a CFG batch: keep the conditional half
                a = a[a.shape[0] // 2 :]
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
    denoising_steps: int = 20,
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
    recorder = PipelineRecorder(pipe, tree, modules, every)
    device = next(tree.parameters()).device
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in tqdm(
            range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False
        ):
            batch = list(prompts[start : start + batch_size])
            recorder.start_run()
            with torch.inference_mode():
                pipe(
                    prompt=batch,
                    num_inference_steps=denoising_steps,
                    guidance_scale=guidance_scale,
                    generator=_generators(start, len(batch), seed, device),
                    output_type="latent",
                    **pipe_kwargs,
                )
    finally:
        recorder.remove()
    return recorder.samples()


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    strengths: Sequence[float],
    steering: Steering | None = None,
    *,
    support: str | None = None,
    denoising_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    guidance: str = "conditional",
    **pipe_kwargs: Any,
) -> list[list[Any]]:
    """`images[p][s]`: prompt p at strength s, one pipeline call with a per-row strength.

    Every strength of a prompt starts from the same noise (seed + prompt index), so the columns
    differ only by the steering. guidance: which classifier-free-guidance half is steered
    (`Steering.applied`). steps= is the old name of denoising_steps=.
    """
    if "steps" in pipe_kwargs:
        warn_renamed("generate_images(steps=...)", "generate_images(denoising_steps=...)")
        denoising_steps = pipe_kwargs.pop("steps")
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
        call = dict(
            prompt=rows,
            num_inference_steps=denoising_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            **pipe_kwargs,
        )
        if steering is None:
            images = pipe(**call).images
        else:
            with steering.applied(pipe, lam, support, guidance=guidance):
                images = pipe(**call).images
    n = len(strengths)
    return [images[p * n : (p + 1) * n] for p in range(len(prompts))]


def image_grid(
    images: Sequence[Sequence[Any]], prompts: Sequence[str], strengths: Sequence[float]
) -> Any:
    """One labelled PNG-ready grid: rows prompts, columns λ."""
    require("PIL", "diffusion", "drawing an image grid")
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
