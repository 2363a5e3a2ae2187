"""Sequential ("causal") estimation: each module's map is fitted on source activations that
already went through the maps of every upstream module.

Instead of one truncated forward pass per module, the source texts are carried through the
decoder blocks one block at a time on cached hidden states (the calibration pattern of
GPTQ-style quantisers): the inputs each block receives (hidden states plus its own keyword
arguments: masks, rotary embeddings) are captured once, then every block runs on the
transported outputs of the block before it. Cost: about one forward pass for propagation plus
the parts of blocks up to each steered module, whatever the number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from actsteer.capture import Recorder, batches, forward_body, output_tensor
from actsteer.errors import ActSteerError
from actsteer.maps import AffineMap
from actsteer.steering import Steering, SteeringInfo
from actsteer.tree import model_device

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


class SequentialFitter:
    """Fits maps module by module, upstream maps applied, for one model and source set."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        source: Sequence[str],
        fit_module: Callable[[str, torch.Tensor], AffineMap],
        *,
        method: str,
        pooling: str,
        support: str,
        batch_size: int,
        max_length: int,
        cap: int | None,
        progress: bool,
    ) -> None:
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.fit_module, self.method = fit_module, method
        self.pooling, self.support, self.cap = pooling, support, cap
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress
        self.maps: dict[str, AffineMap] = {}

    def _steering(self, names: Sequence[str]) -> Steering:
        maps = {n: self.maps[n] for n in names if n in self.maps}
        return Steering(maps, SteeringInfo(method=self.method))

    def _batches(self) -> list[dict[str, torch.Tensor]]:
        return list(
            batches(
                self.tokenizer,
                self.source,
                self.batch_size,
                self.max_length,
                model_device(self.model),
            )
        )

    def fit_by_full_passes(self, modules: Sequence[str], body: nn.Module) -> None:
        """One forward pass per module, all maps fitted so far applied (for modules outside
        the blocks, such as a final norm)."""
        for name in modules:
            recorder = Recorder(self.model, [name], self.pooling, self.cap)
            steering = self._steering(list(self.maps))
            try:
                with torch.inference_mode(), steering.applied(self.model, 1.0, self.support):
                    for batch in self._batches():
                        recorder.mask = batch["attention_mask"].bool()
                        body(**batch, use_cache=False)
            finally:
                recorder.remove()
            self.maps[name] = self.fit_module(name, recorder.samples()[name])

    def fit_blocks(self, blocks: nn.ModuleList, prefix: str, order: Sequence[str]) -> None:
        """Carry the source through the blocks, fitting the chosen modules of each in turn."""
        body = forward_body(self.model, order)
        source_batches = self._batches()
        calls: list[list[tuple]] = [[] for _ in blocks]
        upstream = self._steering(list(self.maps))
        with (
            torch.inference_mode(),
            upstream.applied(self.model, 1.0, self.support),
            _capturing_block_inputs(blocks, calls),
        ):
            for batch in source_batches:
                with suppress(_Stop):
                    body(**batch, use_cache=False)
        hidden = [call[0] for call in calls[0]]
        masks = [batch["attention_mask"].bool() for batch in source_batches]
        in_block = {
            i: [m for m in order if m.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))
        }
        last = max(i for i, names in in_block.items() if names)
        for i in tqdm(
            range(last + 1), desc="sequential fit", disable=not self.progress, leave=False
        ):
            for j, name in enumerate(in_block[i]):
                self._record_and_fit(blocks[i], calls[i], hidden, masks, name, in_block[i][:j])
            if i < last:
                hidden = self._run_block(blocks[i], calls[i], hidden, in_block[i])

    def _run_block(
        self,
        block: nn.Module,
        calls: list[tuple],
        hidden: list[torch.Tensor],
        steered: Sequence[str],
    ) -> list[torch.Tensor]:
        """The block's outputs on every batch, its fitted maps applied."""
        with torch.inference_mode(), self._steering(steered).applied(self.model, 1.0, self.support):
            return [
                output_tensor(block(h, *args, **kwargs))
                for h, (_, args, kwargs) in zip(hidden, calls, strict=True)
            ]

    def _record_and_fit(
        self,
        block: nn.Module,
        calls: list[tuple],
        hidden: list[torch.Tensor],
        masks: list[torch.Tensor],
        name: str,
        before: Sequence[str],
    ) -> None:
        """Run the block up to `name` (maps of earlier modules in it applied) and fit `name`."""
        recorder = Recorder(self.model, [name], self.pooling, self.cap)
        stopper = dict(self.model.named_modules())[name].register_forward_hook(_stop_hook)
        try:
            with (
                torch.inference_mode(),
                self._steering(before).applied(self.model, 1.0, self.support),
            ):
                for h, (_, args, kwargs), mask in zip(hidden, calls, masks, strict=True):
                    recorder.mask = mask
                    with suppress(_Stop):
                        block(h, *args, **kwargs)
        finally:
            stopper.remove()
            recorder.remove()
        self.maps[name] = self.fit_module(name, recorder.samples()[name])

    def run(self, modules: Sequence[str]) -> dict[str, AffineMap]:
        """Fit every module; returns the maps in the given module order."""
        order = execution_order(self.model, self.tokenizer, self.source[0], modules)
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
