"""What a gated steering steered, made visible, and its gate as a detector.

`trace_gates` generates from prompts with a gated steering and keeps, for every generated
token, the gate of the pass that chose it (the mean over the steered modules of the row's gate
at its last position): the strength each token was chosen under is λ times that value.
`render_text` colours the tokens by it for a terminal, `render_html` writes the same as a page.
`score_texts` scores whole texts by the gate alone: per module the mean of the gate's score over
the text's real tokens, averaged over modules, through the gate's threshold and temperature (the
context gate's value at the text's end) — a detector of the source property, whose AUROC on
labelled texts `actsteer monitor` reports.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from rich.text import Text

from actsteer.errors import ActSteerError
from actsteer.generation import left_padding
from actsteer.tree import model_device

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    from actsteer.steering import Steering


@dataclass
class GateTrace:
    """One prompt's generation: its new tokens as text pieces, and each one's gate."""

    prompt: str
    pieces: list[str]
    gates: list[float]


def _gated(steering: Steering) -> None:
    if steering.gate_settings is None:
        raise ActSteerError("the steering has no gate; fit one with --gate or with_gate(...)")


def trace_gates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    steering: Steering,
    strength: float,
    **generate_kwargs: Any,
) -> list[GateTrace]:
    """Greedy generation (unless generate_kwargs say otherwise) of every prompt at `strength`,
    with each new token's gate (see the module)."""
    _gated(steering)
    generate_kwargs.setdefault("max_new_tokens", 40)
    generate_kwargs.setdefault("do_sample", False)
    steps: list[torch.Tensor] = []
    with left_padding(tokenizer):
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    encoded = encoded.to(model_device(model))
    # one λ per row, even 0: a scalar 0 removes the hooks, and the gate would go unseen
    per_row = torch.full((len(prompts),), float(strength))
    with steering.applied(model, per_row) as handle, torch.inference_mode():
        sources = list(handle.gates.values())

        def keep(module: Any, args: Any, output: Any) -> None:
            last = [s.last[:, -1].float().cpu() for s in sources if s.last is not None]
            steps.append(torch.stack(last).mean(0))

        hook = model.register_forward_hook(keep)
        try:
            output = cast("GenerationMixin", model).generate(  # a causal LM's generate
                **encoded, pad_token_id=tokenizer.pad_token_id, **generate_kwargs
            )
        finally:
            hook.remove()
    new = output[:, encoded["input_ids"].shape[1] :]
    traces = []
    for row, prompt in enumerate(prompts):
        ids = [int(t) for t in new[row] if int(t) != tokenizer.pad_token_id]
        pieces = [str(tokenizer.decode([t], skip_special_tokens=True)) for t in ids]
        traces.append(GateTrace(prompt, pieces, [float(steps[i][row]) for i in range(len(ids))]))
    return traces


def render_text(traces: Sequence[GateTrace]) -> Text:
    """Prompts in bold, each new token on a red background as strong as its gate (0: none)."""
    out = Text()
    for trace in traces:
        out.append(trace.prompt, style="bold")
        for piece, g in zip(trace.pieces, trace.gates, strict=True):
            level = int(255 * (1 - min(max(g, 0.0), 1.0)))
            out.append(piece, style=f"on rgb(255,{level},{level})")
        mean = sum(trace.gates) / max(len(trace.gates), 1)
        out.append(f"   [mean gate {mean:.2f}]\n", style="dim")
    return out


def render_html(traces: Sequence[GateTrace], title: str) -> str:
    """The same as a page: every new token's background as red as its gate, its value on
    hover."""
    rows = []
    for trace in traces:
        spans = "".join(
            f'<span title="gate {g:.3f}" style="background: rgba(220, 0, 0, {g:.3f})">'
            f"{html.escape(piece)}</span>"
            for piece, g in zip(trace.pieces, trace.gates, strict=True)
        )
        rows.append(f"<p><b>{html.escape(trace.prompt)}</b>{spans}</p>")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "</head>\n<body style='font-family: sans-serif; max-width: 60em'>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>Each generated token's background is as red as the "
        "gate it was chosen under (λ × gate is its strength).</p>\n"
        + "\n".join(rows)
        + "\n</body></html>\n"
    )


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steering: Steering,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 128,
) -> list[float]:
    """Each text's gate as a detector score in [0, 1] (see the module)."""
    from actsteer.capture import batches, forward_body

    _gated(steering)
    settings = steering.gate_settings
    assert settings is not None
    names = list(steering.gates)
    scores: list[float] = []
    device = model_device(model)
    captured: dict[str, torch.Tensor] = {}
    lookup = dict(model.named_modules())

    def capture(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            a = output[0] if isinstance(output, tuple) else output
            captured[name] = steering.gates[name].score(a)

        return hook

    handles = [lookup[name].register_forward_hook(capture(name)) for name in names]
    try:
        with torch.inference_mode():
            for batch in batches(tokenizer, list(texts), batch_size, max_length, device):
                forward_body(model, names)(**batch, use_cache=False)
                real = batch["attention_mask"].float()
                per_module = [(captured[n] * real).sum(1) / real.sum(1).clamp_min(1) for n in names]
                mean = torch.stack(per_module).mean(0)
                g = torch.sigmoid((mean - settings.threshold) / settings.tau)
                scores += [float(v) for v in g.cpu()]
    finally:
        for handle in handles:
            handle.remove()
    return scores
