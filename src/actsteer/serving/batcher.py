"""The batching engine: one thread owns the model, admits waiting requests into the running
batch between decode steps (continuous batching), applies every row's steerings with per-row
λ, and hands each request its text as it is generated.

A new request's prompt pass runs alone; it then joins the decode batch at the next step, and
leaves it when it finishes or its client goes away. Rows that do not use a steering get λ = 0
for it, where the map is the identity bit for bit; a steering no row uses is not attached.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.gates import require_token_gate
from actsteer.hooks import SteeringHandle
from actsteer.kernels import fused_kernel
from actsteer.serving.batch import DecodeBatch
from actsteer.serving.decoding import Sampler, TextOutput
from actsteer.serving.invariance import row_quantum, use_row_attention
from actsteer.steering import Steering

#: A steering slot: (steering name, support, gated); one attachment of that steering's hooks.
Slot = tuple[str, str, bool]


class Overloaded(ActSteerError):
    """Every slot and queue place is taken."""


@dataclass(frozen=True)
class Event:
    """What a request receives: new text, then a finish reason (or an error)."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    gates: tuple[dict[str, float], ...] = ()  # telemetry: per token since the last event


@dataclass(eq=False)
class Job:
    """One request as the engine sees it. steering: (name, support, λ, gated) in composition
    order; emit: called from the engine thread with each Event; cancelled: set when the client
    left; telemetry: each token's gates (per gated steering, the mean over its modules) travel
    with the events."""

    prompt: list[int]
    sampler: Sampler
    text: TextOutput
    emit: Callable[[Event], None]
    steering: list[tuple[str, str, float, bool]] = field(default_factory=list)
    telemetry: bool = False
    cancelled: bool = False
    last: int = -1  # the row's latest token
    done: bool = False
    gates: list[dict[str, float]] = field(default_factory=list)  # not yet sent

    @property
    def slots(self) -> list[Slot]:
        return [(name, support, gated) for name, support, _, gated in self.steering]


def embed(order: Sequence[Slot], slots: Sequence[Slot]) -> list[int] | None:
    """Where `slots` occur in `order`, in sequence (leftmost match), or None."""
    found, start = [], 0
    for slot in slots:
        try:
            start = order.index(slot, start) + 1
        except ValueError:
            return None
        found.append(start - 1)
    return found


def extend(order: list[Slot], slots: Sequence[Slot]) -> list[Slot]:
    """`order` with the fewest slots inserted so that `slots` occurs in it in sequence."""
    order, start = list(order), 0
    for slot in slots:
        try:
            start = order.index(slot, start) + 1
        except ValueError:
            order.insert(start, slot)
            start += 1
    return order


class Engine:
    """Serve generation requests on `model` with the named steerings (checked against it here).

    At most `max_batch` requests decode together and `max_queue` more wait; `submit` refuses
    beyond that (Overloaded). The model is switched to the per-row attention while the engine
    runs (see `invariance`); `close` switches it back.
    """

    def __init__(
        self,
        model: nn.Module,
        steerings: dict[str, Steering],
        max_batch: int = 16,
        max_queue: int = 64,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ActSteerError(
                f"max_batch must be ≥ 1 and max_queue ≥ 0, got {max_batch}, {max_queue}"
            )
        for name, steering in steerings.items():
            try:
                steering.check_compatible(model)
            except ActSteerError as err:
                raise ActSteerError(f"steering {name!r}: {err}") from None
            require_token_gate(
                name, steering.gate_settings, "row's scores across passes; the server's batch "
                "changes rows between steps, so it serves token gates",
            )  # fmt: skip
        param = next(model.parameters())
        if steerings and param.device.type == "cpu":
            fused_kernel()  # built now (once per machine) rather than on the first request
        self.model = model
        self.steerings = steerings
        self.max_batch, self.max_queue = max_batch, max_queue
        config: Any = model.config
        self.attention_before = use_row_attention(model)
        hidden = getattr(config, "text_config", config).hidden_size
        self.batch = DecodeBatch(model, row_quantum(hidden, param.device, param.dtype))
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []  # in the decode batch, in its row order
        self.admitting: list[Job] = []  # taken from the queue, prompt pass not yet run
        self.wake = threading.Condition()
        self.stopping = False
        self.reason = "the server is shutting down"
        self.peak = 0  # the most rows decoded together so far
        self.order: list[Slot] = []  # the slots of the running rows, in hook order
        self.handles: list[SteeringHandle] = []  # their handles, in the same order
        self.pool: dict[Slot, list[SteeringHandle]] = {}  # attached once, reused
        self.applied: tuple[list[Slot], list[list[float]]] | None = None
        self.thread = threading.Thread(target=self._loop, name="actsteer-engine", daemon=True)
        self.thread.start()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; those in their prompt pass count as running."""
        with self.wake:
            return len(self.running) + len(self.admitting), len(self.waiting)

    def submit(self, job: Job) -> None:
        """Queue a request, or raise Overloaded when every place is taken."""
        with self.wake:
            if self.stopping:
                raise Overloaded("the server is shutting down; retry on another server")
            running = len(self.running) + len(self.admitting)
            if running + len(self.waiting) >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"the server is busy ({running} requests running, {len(self.waiting)} "
                    "waiting); retry later"
                )
            self.waiting.append(job)
            self.wake.notify()

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Stop after the current step, without waiting: requests still waiting or running
        get an error event saying `reason`; new ones are refused."""
        with self.wake:
            self.stopping = True
            self.reason = reason
            self.wake.notify()

    def close(self) -> None:
        """Stop, wait for the engine thread, and restore the model."""
        self.stop(self.reason)
        self.thread.join()

    # ---- the engine thread

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.running):
                    self.wake.wait()
                if self.stopping:
                    break
                room = self.max_batch - len(self.running)
                self.admitting = [
                    self.waiting.popleft() for _ in range(min(room, len(self.waiting)))
                ]
            try:
                with torch.inference_mode():
                    while self.admitting:
                        self._prompt_pass(self.admitting[0])
                    self._drop_done()
                    if self.running:
                        self._step()
                        self._drop_done()
            except Exception as err:  # a failed step ends its batch's requests, not the server
                self._fail([*self.running, *self.admitting], f"generation failed: {err}")
                self.batch.keep([])
                with self.wake:
                    self.running, self.admitting = [], []
                self._idle()
        self._fail([*self.waiting, *self.running, *self.admitting], self.reason)
        for handles in self.pool.values():
            for handle in handles:
                handle.remove()
        self.model.set_attn_implementation(self.attention_before)  # type: ignore[operator]

    def _prompt_pass(self, job: Job) -> None:
        """Run a new request's prompt alone; it joins the batch with its first token."""
        if not job.cancelled:
            self._steer([job], 0)
            logits, cache = self.batch.prompt_pass(job.prompt)
            self.batch.add(cache, len(job.prompt))
            self._next(job, logits, 0)
        with self.wake:
            self.admitting.remove(job)
            if not job.cancelled:
                self.running.append(job)

    def _step(self) -> None:
        fill = self.batch.slots - len(self.running)
        self.peak = max(self.peak, len(self.running))
        self._steer(self.running, fill)
        logits = self.batch.step([job.last for job in self.running])
        for row, (job, scores) in enumerate(zip(self.running, logits, strict=True)):
            self._next(job, scores, row)

    def _next(self, job: Job, logits: torch.Tensor, row: int) -> None:
        """Choose the row's next token and send the request its text (and, with telemetry, the
        gates of the pass that chose it)."""
        token = job.sampler(logits)
        text, reason = job.text.add(token)
        job.last = token
        job.done = reason is not None
        if job.telemetry:
            job.gates.append(self._gates(job, row))
        if text or reason:
            job.emit(Event(text, reason, job.text.count, gates=tuple(job.gates)))
            job.gates = []

    def _gates(self, job: Job, row: int) -> dict[str, float]:
        """Each gated steering of the job: the mean over its modules of the row's gate at the
        last position of this pass."""
        found = {}
        for (name, _, _, gated), place in zip(job.steering, embed(self.order, job.slots) or [],
                                              strict=True):  # fmt: skip
            sources = self.handles[place].gates.values() if gated else ()
            values = [float(s.last[row, -1]) for s in sources if s.last is not None]
            if values:
                found[name] = sum(values) / len(values)
        return found

    def _drop_done(self) -> None:
        """Remove finished and abandoned rows from the batch: their places free up."""
        keep = [i for i, job in enumerate(self.running) if not (job.done or job.cancelled)]
        if len(keep) == len(self.running):
            return
        self.batch.keep(keep)
        with self.wake:
            self.running = [self.running[i] for i in keep]
        if not self.running:
            self._idle()

    def _steer(self, jobs: list[Job], fill: int) -> None:
        """Hooks for these rows (and `fill` copies of the first): the steering slots in an order
        every row's composition occurs in, each with a per-row λ (0 where a row does not use
        it; no hooks where no row does). A slot's handle is attached once and reused."""
        order = self.order
        for job in jobs:
            if embed(order, job.slots) is None:
                order = extend(order, job.slots)
        self.order = order
        strengths = [[0.0] * (len(jobs) + fill) for _ in order]
        for row, job in enumerate(jobs + jobs[:1] * fill):
            slots = embed(order, job.slots) or []
            for slot, (_, _, lam, _) in zip(slots, job.steering, strict=True):
                strengths[slot][row] = lam
        if self.applied == (order, strengths):
            return
        handles = self.handles = self._handles(order)
        for handle in {h for hs in self.pool.values() for h in hs} - set(handles):
            handle.set_strength(0.0)
        for handle, lams in zip(handles, strengths, strict=True):  # in order: hooks re-register
            handle.set_strength(torch.tensor(lams) if any(lams) else 0.0)
        self.applied = (list(order), strengths)

    def _handles(self, order: list[Slot]) -> list[SteeringHandle]:
        """A handle for each position of `order` (a slot occurring twice gets two)."""
        used: dict[Slot, int] = {}
        handles = []
        for slot in order:
            pool = self.pool.setdefault(slot, [])
            k = used[slot] = used.get(slot, -1) + 1
            if k == len(pool):  # each its own copy: the same steering may be attached twice
                steering = self.steerings[slot[0]]
                copy = replace(steering, maps=dict(steering.maps))
                pool.append(copy.attach(self.model, 0.0, slot[1], gated=slot[2]))
            handles.append(pool[k])
        return handles

    def _idle(self) -> None:
        """No rows: every hook off (handles kept), the slot order forgotten."""
        for handles in self.pool.values():
            for handle in handles:
                handle.set_strength(0.0)
        self.order, self.applied = [], None

    @staticmethod
    def _fail(jobs: Sequence[Job], message: str) -> None:
        for job in jobs:
            if not (job.cancelled or job.done):
                job.emit(Event(error=message))
