"""The vLLM plugin: actsteer maps applied per request inside vLLM's model runner, no fork.

Four of vLLM's extension points, wired by `engine_args` (or the matching `vllm serve`
flags):

- a `vllm.general_plugins` entry point (`register`) adds the model loader `actsteer`
  (`load_format="actsteer"`): vLLM's default loader, then one forward hook per steered module
  and one pre-hook on the model that takes each pass's request boundaries (`query_start_loc`)
  from vLLM's forward context;
- the logits processor `RequestSteering` (`logits_processors=[...]`) checks each request's
  `SamplingParams.extra_args["actsteer"]` when it arrives (a bad one is refused with a clear
  message, HTTP 400 online) and, in the worker, keeps the batch's steerings in batch order
  from vLLM's batch updates; it leaves the logits alone;
- the scheduler `SteeringScheduler` (`scheduler_cls`, vLLM's Scheduler with one change) salts
  each steered request's prefix cache by its steerings (`cache_salt`), so prefix caching stays
  on: a prefix computed under one steering is reused only under the same one;
- the steerings served come from `ACTSTEER_VLLM_STEERINGS=name=path[,name=path]`, read in
  every vLLM process.

Module names are the Hugging Face names of the artifact; vLLM keeps them for the norms, the
output projections and the decoder blocks, whose outputs are taken as the HF module's output:
a norm called with a residual returns (normed, residual) and `normed` is steered; a linear
layer returns (output, bias) and `output` is steered; a decoder block returns
(hidden, residual), whose sum is the residual stream, and it returns (0, steered stream).
Modules vLLM fuses (q/k/v_proj into qkv_proj, gate/up_proj into gate_up_proj) are refused at
start-up. A gated steering's token gates apply per token (context and prompt gates, which carry
a request's scores across passes, are refused).

Two ways to run, chosen by vLLM's compilation mode:

- compiled (vLLM's default: `DYNAMO_TRACE_ONCE` on CPU, `VLLM_COMPILE` on GPUs, with no CUDA
  graphs or piecewise ones): each steered module holds its maps stacked in tables and a traced
  hook reads each token's steerings from persistent slot buffers that the model's pre-hook
  rewrites in place once per step (actsteer.integrations.slots); λ, the requests and their mix
  change buffers, never the graph. Full CUDA graphs (which replay the whole forward without the
  pre-hook), stock torch.compile and inductor's freezing (which bakes buffers in as constants)
  are refused. The served steerings' layout is added to `additional_config`, which vLLM hashes
  into its compile cache's key, so a graph traced for one set of steerings is never loaded for
  another.
- eager (`enforce_eager=True`): hooks apply the batch's stages in Python
  (actsteer.integrations.batch).

Prefix caching needs the scheduler (a KV cache computed under one steering would otherwise be
reused by a request with another).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import CompilationMode, CUDAGraphMode
from vllm.exceptions import VLLMValidationError
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, LayerNorm, RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.model_loader import DefaultModelLoader, register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from actsteer.errors import ActSteerError
from actsteer.gates import Gate, GateSettings, require_token_gate
from actsteer.integrations.batch import (
    ARG_KEY,
    ENV,
    BatchSteering,
    Spec,
    cache_salt,
    load_table,
    parse_request,
)
from actsteer.integrations.slots import TableSteering, TokenSlots
from actsteer.sources import Gated
from actsteer.transport import AnyTransport, Transport
from actsteer.tree import output_tensor, with_output

LOAD_FORMAT = "actsteer"
LOGITS_PROCESSOR = "actsteer.integrations.vllm:RequestSteering"
SCHEDULER = "actsteer.integrations.vllm.SteeringScheduler"
NORMS = (RMSNorm, GemmaRMSNorm, LayerNorm, nn.LayerNorm, nn.RMSNorm)
#: HF projections vLLM fuses into one layer, by leaf name.
FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}
_BLOCK = re.compile(r"(?:.*\.)?layers\.\d+")
#: The compilation modes the plugin runs under, and the CUDA-graph modes among them.
COMPILED_MODES = (CompilationMode.DYNAMO_TRACE_ONCE, CompilationMode.VLLM_COMPILE)
GRAPH_MODES = (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE)
#: The key of vLLM's additional_config that carries the compiled steering's layout.
LAYOUT_KEY = "actsteer_layout"
#: The batch state of each engine in this process, by vLLM instance id: the logits processor
#: writes it, the hooks read it.
_BATCHES: dict[str, BatchSteering] = {}


def engine_args(steerings: Mapping[str, str | Path], compiled: bool = True) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` that serve `steerings` (name → artifact path).

    Sets ACTSTEER_VLLM_STEERINGS in this process's environment (vLLM's processes inherit it)
    and returns the loader, the logits processor and the scheduler that salts each steered
    request's prefix cache (prefix caching stays on); `compiled`: vLLM's compiled graphs with
    piecewise CUDA graphs at most, else eager execution.
    """
    os.environ[ENV] = ",".join(f"{name}={path}" for name, path in steerings.items())
    for name, steering in served().items():  # a bad table fails here, before vLLM starts
        fused = [m for m in steering.maps if m.rpartition(".")[2] in FUSED]
        if fused:
            raise ActSteerError(
                f"steering {name!r} steers {fused[0]!r}, which vLLM fuses into "
                f"{FUSED[fused[0].rpartition('.')[2]]}; steer norms or output projections"
            )
    execution: dict[str, Any] = (
        {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}
        if compiled
        else {"enforce_eager": True}
    )
    return {
        "load_format": LOAD_FORMAT,
        "logits_processors": [LOGITS_PROCESSOR],
        "scheduler_cls": SCHEDULER,
        **execution,
    }


def served() -> dict[str, Any]:
    """The steerings this process serves, from ACTSTEER_VLLM_STEERINGS (loaded once)."""
    return _loaded(os.environ.get(ENV, ""))


@lru_cache(maxsize=4)
def _loaded(text: str) -> dict[str, Any]:
    return load_table(text)


def batch_of(vllm_config: Any) -> BatchSteering:
    """The batch state of the engine with this config, made on first use."""
    key = vllm_config.instance_id
    if key not in _BATCHES:
        _BATCHES[key] = BatchSteering(served())
    return _BATCHES[key]


def register() -> None:
    """The `vllm.general_plugins` entry point: makes `load_format="actsteer"` known."""
    register_model_loader(LOAD_FORMAT)(SteeringLoader)


class RequestSteering(LogitsProcessor):
    """Each request's steerings: checked on arrival, tracked in batch order in the worker."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        value = (sampling_params.extra_args or {}).get(ARG_KEY)
        if value is not None:
            try:
                parse_request(value, served())
            except ActSteerError as err:
                raise VLLMValidationError(str(err), parameter=f"extra_args.{ARG_KEY}") from None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        if vllm_config.load_config.load_format != LOAD_FORMAT:
            raise ActSteerError(
                f"the logits processor {LOGITS_PROCESSOR} only tracks requests; the hooks come "
                f'with load_format="{LOAD_FORMAT}" (--load-format {LOAD_FORMAT}): pass both'
            )
        self.batch = batch_of(vllm_config)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return

        def spec(params: Any, prompt: object, output: object) -> Spec | None:
            value = (params.extra_args or {}).get(ARG_KEY)
            return (parse_request(value, self.batch.steerings) or None) if value else None

        process_dict_updates(self.batch.requests, batch_update, spec)
        self.batch.set_batch(batch_update.batch_size)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True


class SteeringScheduler(Scheduler):
    """vLLM's scheduler, with each steered request's prefix cache salted by its steerings
    (`cache_salt` of actsteer.integrations.batch, before any salt of its own): a prompt's KV
    blocks computed under one steering are reused only by requests with the same steerings,
    and unsteered requests share theirs as usual."""

    def add_request(self, request: Any) -> None:
        value = (getattr(request.sampling_params, "extra_args", None) or {}).get(ARG_KEY)
        salt = cache_salt(parse_request(value, served())) if value else None
        if salt is not None:
            request.cache_salt = salt + (f":{request.cache_salt}" if request.cache_salt else "")
            request.block_hashes.clear()  # hashed at arrival without the salt
            request.update_block_hashes()
        super().add_request(request)


class SteeringLoader(BaseModelLoader):
    """vLLM's default loader, then the hooks of the served steerings on the loaded model."""

    def __init__(self, load_config: Any) -> None:
        super().__init__(load_config)
        self.inner = DefaultModelLoader(dataclasses.replace(load_config, load_format="auto"))

    def download_model(self, model_config: Any) -> None:
        self.inner.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: Any) -> None:
        self.inner.load_weights(model, model_config)

    def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> nn.Module:
        check_engine(vllm_config)
        model = self.inner.load_model(vllm_config, model_config, prefix)
        batch = batch_of(vllm_config)
        if vllm_config.compilation_config.mode == CompilationMode.NONE:
            install(model, batch, model_config.get_hidden_size())
        else:
            capacity = vllm_config.scheduler_config.max_num_batched_tokens
            layout = install_tables(model, batch, model_config.get_hidden_size(), capacity)
            key_compile_cache(vllm_config, layout)
        return model


def check_engine(vllm_config: Any) -> None:
    """Refuse engine settings the hooks cannot run under, saying what to change."""
    compilation = vllm_config.compilation_config
    if compilation.mode not in (CompilationMode.NONE, *COMPILED_MODES):
        raise ActSteerError(
            f"actsteer runs under vLLM's compilation modes {[m.name for m in COMPILED_MODES]} "
            f"or eager execution, not {compilation.mode.name}: leave the mode at vLLM's default "
            "or start vLLM with enforce_eager=True (--enforce-eager)"
        )
    if compilation.cudagraph_mode not in GRAPH_MODES:
        raise ActSteerError(
            f"actsteer cannot steer under CUDA-graph mode {compilation.cudagraph_mode.name}: a "
            "full CUDA graph replays the whole forward without the per-step update of each "
            'token\'s steering; use compilation_config={"cudagraph_mode": "PIECEWISE"} '
            "(-cc.cudagraph_mode=PIECEWISE), as actsteer's engine_args does, or enforce_eager"
        )
    inductor = compilation.inductor_compile_config
    if inductor.get("max_autotune") or inductor.get("freezing"):
        raise ActSteerError(
            "actsteer cannot steer with inductor's max_autotune or freezing: both freeze the "
            "model's buffers into constants, and the steering's per-token buffers change every "
            "step; leave them off"
        )
    scheduler = vllm_config.scheduler_config.scheduler_cls
    if vllm_config.cache_config.enable_prefix_caching and scheduler not in (
        SCHEDULER,
        SteeringScheduler,
    ):
        raise ActSteerError(
            "actsteer's steering changes the KV cache a prompt leaves, so vLLM's prefix cache "
            "would serve one request's steered prefix to another: start vLLM with "
            f"scheduler_cls={SCHEDULER!r} (--scheduler-cls {SCHEDULER}), which keeps each "
            "steering's prefixes apart, or with enable_prefix_caching=False"
        )
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 or parallel.use_ubatching:
        raise ActSteerError(
            "actsteer's hooks do not support pipeline parallelism or micro-batching; "
            "use tensor parallelism or one device"
        )
    processors = vllm_config.model_config.logits_processors or ()
    if not any(p == LOGITS_PROCESSOR or p is RequestSteering for p in processors):
        raise ActSteerError(
            f"load_format={LOAD_FORMAT!r} needs its logits processor to see the requests: pass "
            f"logits_processors=[{LOGITS_PROCESSOR!r}] (--logits-processors {LOGITS_PROCESSOR})"
        )


def _width(name: str, module: nn.Module, hidden: int) -> int:
    """The width of the tensor the HF module of this name outputs, or a clear refusal."""
    if _BLOCK.fullmatch(name):
        return hidden
    if isinstance(module, NORMS):
        return int(module.weight.shape[-1])
    if isinstance(module, RowParallelLinear) and module.tp_size > 1 and not module.reduce_results:
        raise ActSteerError(
            f"cannot steer {name!r} in vLLM: under tensor parallelism its output is a partial "
            "sum, reduced elsewhere; steer the norm after it instead"
        )
    if isinstance(module, RowParallelLinear | ReplicatedLinear):
        return int(module.output_size)
    fused = isinstance(module, ColumnParallelLinear)
    kind = "column-parallel (fused) projection" if fused else type(module).__name__
    raise ActSteerError(
        f"cannot steer {name!r} in vLLM: it is a {kind}, not a norm, "
        "an output projection (o_proj, down_proj) or a decoder block"
    )


def mapped_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The vLLM modules of the artifact's HF module names; unmappable ones are refused."""
    lookup = dict(model.named_modules())
    found = {}
    for name in names:
        module = lookup.get(name)
        if module is None:
            leaf = name.rpartition(".")[2]
            where = f"inside vLLM's fused {FUSED[leaf]}" if leaf in FUSED else "not in the model"
            raise ActSteerError(
                f"cannot steer {name!r} in vLLM: it is {where}; steer norms "
                "(post-attn-ln, layernorms), attn-out, mlp-out or decoder blocks instead"
            )
        found[name] = module
    return found


#: Per module a served steering touches: steering name → (its transport, its token gate with
#: the steering's gate settings, or None).
ServedMaps = dict[str, dict[str, tuple[AnyTransport, tuple[Gate, GateSettings] | None]]]


def served_maps(model: nn.Module, batch: BatchSteering, hidden: int) -> ServedMaps:
    """The maps of the served steerings by module, every one mapped onto this model and
    checked (only token gates; widths) before anything is hooked."""
    per_module: ServedMaps = {}
    for steering_name, steering in batch.steerings.items():
        gating = steering.gate_settings
        require_token_gate(
            steering_name, gating, "request's scores across passes; the plugin applies token gates"
        )
        modules = mapped_modules(model, list(steering.maps))
        for name, amap in steering.maps.items():
            check_width(steering_name, name, amap.dim, _width(name, modules[name], hidden))
            gate = steering.gates.get(name) if gating is not None else None
            per_module.setdefault(name, {})[steering_name] = (
                amap.transport(steering.default_support),
                None if gate is None or gating is None else (gate, gating),
            )
    return per_module


def install(model: nn.Module, batch: BatchSteering, hidden: int) -> None:
    """Hook every module the served steerings touch, and the model's per-pass pre-hook."""
    first = next(model.parameters())
    lookup = dict(model.named_modules())
    for name, maps in served_maps(model, batch, hidden).items():
        steered: dict[str, tuple[AnyTransport, Gated | None]] = {}
        for steering_name, (transport, gate) in maps.items():
            transport.parameters(first.device, first.dtype)  # placed now, not in the first pass
            steered[steering_name] = (transport, None if gate is None else Gated(*gate, None))
        hook = ModuleSteering(batch, steered, stream=bool(_BLOCK.fullmatch(name)))
        lookup[name].register_forward_hook(hook)
    model.register_forward_pre_hook(PassStart(batch))


def install_tables(
    model: nn.Module, batch: BatchSteering, hidden: int, capacity: int
) -> list[object]:
    """For compiled execution: every module the served steerings touch gets its stacked
    tables and a traced hook, the model a pre-hook that fills the token slots (`capacity`
    tokens per step at most). Returns the layout the compiled graph depends on: the number of
    slots, then per module its name, whether gated, whether bounded, and its table's rows."""
    first = next(model.parameters())
    per_module = {  # every map checked before anything is hooked
        name: {
            batch.ids[steering_name]: (tabled(steering_name, transport), gate)
            for steering_name, (transport, gate) in maps.items()
        }
        for name, maps in served_maps(model, batch, hidden).items()
    }
    slots = TokenSlots(len(batch.steerings), capacity, first.device)
    lookup = dict(model.named_modules())
    layout: list[object] = [len(batch.steerings)]
    for name, maps in sorted(per_module.items()):
        module, stream = lookup[name], bool(_BLOCK.fullmatch(name))
        hook = TableSteering(module, maps, len(batch.steerings), slots, first.dtype, stream)
        module.register_forward_hook(hook)
        layout.append((name, hook.gated, hook.bounded, len(maps) + 1))
    model.register_forward_pre_hook(PassStart(batch, slots))
    return layout


def tabled(steering_name: str, transport: AnyTransport) -> Transport:
    """`transport` where an affine table row holds it; a clear error for piecewise maps."""
    if isinstance(transport, Transport):
        return transport
    raise ActSteerError(
        f"steering {steering_name!r} has maps that are not affine (quantile or joint), "
        "which the compiled graphs' affine tables cannot hold; serve it eagerly: "
        "engine_args(..., compiled=False), or `vllm serve --enforce-eager`"
    )


def key_compile_cache(vllm_config: Any, layout: list[object]) -> None:
    """Put the steering's layout into `additional_config`, which vLLM hashes into the key of
    its compile cache (computed when the model is first compiled, after loading)."""
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise ActSteerError(
            "actsteer's compiled mode keys vLLM's compile cache by the served steerings through "
            f"additional_config, which this platform made a {type(extra).__name__}; start vLLM "
            "with enforce_eager=True (--enforce-eager)"
        )
    extra[LAYOUT_KEY] = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def check_width(steering_name: str, name: str, units: int, width: int) -> None:
    """Refuse a map whose units do not match the module's output width in this model."""
    if width != units:
        raise ActSteerError(
            f"steering {steering_name!r} has {units} units for {name!r}, whose "
            f"output in this model has {width}: it was fitted on another model"
        )


class PassStart:
    """Model pre-hook: hand this pass's request boundaries to the batch state (eager), or
    spread the requests' slots over this pass's tokens (compiled: `slots`)."""

    def __init__(self, batch: BatchSteering, slots: TokenSlots | None = None) -> None:
        self.batch = batch
        self.slots = slots

    def __call__(self, module: nn.Module, args: object) -> None:
        if not self.batch.stages and self.slots is None:
            return
        metadata = get_forward_context().attn_metadata
        first = next(iter(metadata.values()), None) if isinstance(metadata, dict) else None
        boundaries = None if first is None else first.query_start_loc
        if self.slots is None:
            self.batch.begin_pass(boundaries)
        else:
            self.slots.fill(*self.batch.slots, boundaries if self.batch.stages else None)


class ModuleSteering:
    """Forward hook of one module: each stage's map at its per-token λ (times its token gate,
    for a gated steering), in stage order, on the tensor the HF module outputs (actsteer.tree's
    helpers read it and put it back)."""

    def __init__(
        self,
        batch: BatchSteering,
        maps: dict[str, tuple[AnyTransport, Gated | None]],
        stream: bool,
    ) -> None:
        self.batch = batch
        self.maps = maps
        self.stream = stream  # a decoder block: (hidden, residual) sum to the residual stream

    def __call__(self, module: nn.Module, args: object, output: Any) -> Any:
        if not self.batch.stages:
            return None
        a = output_tensor(output, residual=self.stream)
        stages = self.batch.token_stages(a.shape[0])
        if not stages:
            return None
        for steering_name, lam in stages:
            found = self.maps.get(steering_name)
            if found is not None:
                transport, gate = found
                a = transport(a, lam if gate is None else gate(lam, a))
        return with_output(output, a, residual=self.stream)
