"""Sequential ("causal") estimation, the paper's default: each module's map is fitted on the
activations of both the source and the target texts recorded with the maps of every upstream
module applied (λ = 1, the fit's support), in execution order, earlier modules of the same block
included.

Instead of one truncated forward pass per module, both sets are carried through the decoder
blocks one block at a time on cached hidden states (the calibration pattern of GPTQ-style
quantisers): the inputs each block receives (hidden states plus its own keyword arguments:
masks, rotary embeddings) are captured once, then every block runs on the transported outputs
of the block before it. Cost: about one forward pass per set for propagation plus the parts of
blocks up to each steered module, whatever the number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.capture import Recorder, batches, forward_body
from actsteer.errors import ActSteerError
from actsteer.maps import UnitMap
from actsteer.steering import Steering, SteeringInfo
from actsteer.tree import model_device, output_tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


def _stop_hook(*_: object) -> None:
    raise _Stop


def find_blocks(model: nn.Module, modules: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The list of repeated blocks (decoder layers) holding the most of the chosen modules."""
    best, best_count = None, 0
    for name, child in model.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        if len({type(block) for block in child}) != 1:
            continue
        count = sum(m.startswith(name + ".") for m in modules)
        if count > best_count:
            best, best_count = (name, child), count
    return best


def execution_order(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, modules: Sequence[str]
) -> list[str]:
    """The chosen modules in the order a forward pass calls them."""
    order: list[str] = []
    lookup = dict(model.named_modules())

    def tracer(name: str) -> Callable[..., None]:
        return lambda *_: order.append(name) if name not in order else None

    handles = [lookup[n].register_forward_hook(tracer(n)) for n in modules]
    try:
        with torch.inference_mode():
            for batch in batches(tokenizer, [text], 1, 16, model_device(model)):
                forward_body(model, modules)(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in modules if n not in order]
    if missing:
        raise ActSteerError(f"module {missing[0]!r} is never called in a forward pass; drop it")
    return order


@contextmanager
def _capturing_block_inputs(blocks: nn.ModuleList, calls: list[list[tuple]]):
    """Replace each block's forward by one that records its inputs and passes hidden states on.

    calls[i] receives (hidden_states, other positional args, keyword args) per forward pass;
    the pass stops after the last block, so capturing costs next to nothing.
    """

    def stub(index: int):
        def forward(*args: object, **kwargs: object) -> object:
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            calls[index].append((hidden if index == 0 else None, rest, kwargs))
            if index == len(blocks) - 1:
                raise _Stop
            return hidden

        return forward

    for index, block in enumerate(blocks):
        block.forward = stub(index)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


#: The two text sets carried through the model, in the order they are recorded.
SETS = ("source", "target")
Estimate = Callable[[str, torch.Tensor, torch.Tensor], UnitMap]


class _Carried:
    """One text set stepped through the blocks: its batches, each block's captured inputs
    (positional and keyword arguments per batch) and the hidden states entering the next block."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], blocks: int) -> None:
        self.batches = batches
        self.masks = [batch["attention_mask"].bool() for batch in batches]
        self.calls: list[list[tuple]] = [[] for _ in range(blocks)]
        self.hidden: list[torch.Tensor] = []


class SequentialFitter:
    """Fits maps module by module, upstream maps applied to both sets, for one model."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        source: Sequence[str],
        target: Sequence[str],
        estimate: Estimate,
        *,
        method: str,
        pooling: str,
        support: str,
        batch_size: int,
        max_length: int,
        cap: int | None,
        progress: bool,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.texts = {"source": source, "target": target}
        self.estimate, self.method = estimate, method
        self.pooling, self.support, self.cap = pooling, support, cap
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress
        self.maps: dict[str, UnitMap] = {}

    def _steering(self, names: Sequence[str]) -> Steering:
        maps = {n: self.maps[n] for n in names if n in self.maps}
        return Steering(maps, SteeringInfo(method=self.method))

    def _batches(self, texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        device = model_device(self.model)
        return list(batches(self.tokenizer, texts, self.batch_size, self.max_length, device))

    def _fit(self, name: str, samples: dict[str, torch.Tensor]) -> None:
        self.maps[name] = self.estimate(name, samples["source"], samples["target"])

    def fit_by_full_passes(self, modules: Sequence[str], body: nn.Module) -> None:
        """One forward pass of both sets per module, all maps fitted so far applied (for modules
        outside the blocks, such as a final norm)."""
        for name in modules:
            samples = {}
            steering = self._steering(list(self.maps))
            for what in SETS:
                recorder = Recorder(self.model, [name], self.pooling, self.cap)
                try:
                    with torch.inference_mode(), steering.applied(self.model, 1.0, self.support):
                        for batch in self._batches(self.texts[what]):
                            recorder.mask = batch["attention_mask"].bool()
                            body(**batch, use_cache=False)
                finally:
                    recorder.remove()
                samples[what] = recorder.samples()[name]
            self._fit(name, samples)

    def fit_blocks(self, blocks: nn.ModuleList, prefix: str, order: Sequence[str]) -> None:
        """Carry both sets through the blocks, fitting the chosen modules of each in turn."""
        body = forward_body(self.model, order)
        upstream = self._steering(list(self.maps))
        carried = {what: _Carried(self._batches(self.texts[what]), len(blocks)) for what in SETS}
        for state in carried.values():
            with (
                torch.inference_mode(),
                upstream.applied(self.model, 1.0, self.support),
                _capturing_block_inputs(blocks, state.calls),
            ):
                for batch in state.batches:
                    with suppress(_Stop):
                        body(**batch, use_cache=False)
            state.hidden = [call[0] for call in state.calls[0]]
        in_block = {  # a block's own output (the residual stream) comes after its modules
            i: [m for m in order if m == f"{prefix}.{i}" or m.startswith(f"{prefix}.{i}.")]
            for i in range(len(blocks))
        }
        last = max(i for i, names in in_block.items() if names)
        for i in tqdm(
            range(last + 1), desc="sequential fit", disable=not self.progress, leave=False
        ):
            for j, name in enumerate(in_block[i]):
                samples = {
                    what: self._record(blocks[i], i, state, name, in_block[i][:j])
                    for what, state in carried.items()
                }
                self._fit(name, samples)
            if i < last:
                for state in carried.values():
                    state.hidden = self._run_block(blocks[i], i, state, in_block[i])

    def _run_block(
        self, block: nn.Module, index: int, state: _Carried, steered: Sequence[str]
    ) -> list[torch.Tensor]:
        """The block's outputs on every batch of a set, its fitted maps applied."""
        with torch.inference_mode(), self._steering(steered).applied(self.model, 1.0, self.support):
            return [
                output_tensor(block(h, *args, **kwargs))
                for h, (_, args, kwargs) in zip(state.hidden, state.calls[index], strict=True)
            ]

    def _record(
        self, block: nn.Module, index: int, state: _Carried, name: str, before: Sequence[str]
    ) -> torch.Tensor:
        """A set's samples at `name`: the block run up to it, earlier modules' maps applied."""
        recorder = Recorder(self.model, [name], self.pooling, self.cap)
        stopper = dict(self.model.named_modules())[name].register_forward_hook(_stop_hook)
        try:
            with (
                torch.inference_mode(),
                self._steering(before).applied(self.model, 1.0, self.support),
            ):
                batches_in = zip(state.hidden, state.calls[index], state.masks, strict=True)
                for h, (_, args, kwargs), mask in batches_in:
                    recorder.mask = mask
                    with suppress(_Stop):
                        block(h, *args, **kwargs)
        finally:
            stopper.remove()
            recorder.remove()
        return recorder.samples()[name]

    def run(self, modules: Sequence[str]) -> dict[str, UnitMap]:
        """Fit every module; returns the maps in the given module order."""
        order = execution_order(self.model, self.tokenizer, self.texts["source"][0], modules)
        found = find_blocks(self.model, order)
        body = forward_body(self.model, order)
        if found is None:
            self.fit_by_full_passes(order, body)
        else:
            prefix, blocks = found
            inside = [i for i, n in enumerate(order) if n.startswith(prefix + ".")]
            before, after = order[: inside[0]], order[inside[-1] + 1 :]
            between = [
                n for n in order[inside[0] : inside[-1] + 1] if not n.startswith(prefix + ".")
            ]
            if between:
                self.fit_by_full_passes(order, body)
            else:
                self.fit_by_full_passes(before, body)
                self.fit_blocks(blocks, prefix, [order[i] for i in inside])
                self.fit_by_full_passes(after, body)
        return {name: self.maps[name] for name in modules}
