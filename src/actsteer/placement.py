"""Where a model runs and in which dtype: what `--device` and `--dtype` accept, checked before
any weight is read, so that a machine without the device asked for says so at once."""

from __future__ import annotations

from typing import Literal

import torch

from actsteer.choices import DEVICE_FORMS, DTYPE_NAMES, check_choice
from actsteer.errors import ActSteerError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | Literal["auto"]:
    """A torch dtype from a dtype or its name; "auto" (the checkpoint's dtype) as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    check_choice(dtype, DTYPE_NAMES, "dtype")
    return "auto" if dtype == "auto" else DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device | Literal["auto"]:
    """The device asked for, when this machine has it; "auto" (accelerate spreads the model
    over the GPUs there are, then the CPU) as it is."""
    if device == "auto":
        return "auto"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ActSteerError(f"unknown device {device!r}; give {DEVICE_FORMS}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ActSteerError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA GPU (a CPU-only "
                "build of torch, or no driver); use --device cpu, or install a CUDA build"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ActSteerError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ActSteerError(f"device {device!r}: Apple's MPS is not available here")
    elif parsed.type != "cpu":
        raise ActSteerError(f"device {device!r} is not supported; give {DEVICE_FORMS}")
    return parsed
