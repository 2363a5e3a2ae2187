"""A fused CPU kernel for the steering hook's transport, built once per machine.

With a bounded support (the default q0-100) the hook computes ω̃·a + λβ inside per-unit bounds
and keeps a outside them. As separate torch ops that is six passes and as many dispatches,
several times the cost of the unbounded map at decoding sizes; transport.cpp does it in
one pass, bit for bit the same result. It also applies per-channel maps to (B, C, H, W) outputs
without broadcasting and leaves the unconditional half of a classifier-free-guidance batch
untouched without a concatenation. A norm's fresh output that no other hook has seen is
overwritten in place, saving an allocation. Support "all" passes infinite bounds. The kernel is
called through CPython's fast calling convention rather than pybind11: inside a model, where
caches are cold, pybind11's dispatch cost more than the arithmetic. `hook(...)` binds the
parameters, checked once, into a forward hook implemented in C++, so no Python frame runs per
call; what it does not handle (other devices or dtypes, non-contiguous outputs, a gradient to
carry, tensor subclasses, tuple outputs, shapes that do not fit) goes to the Python hook and its
torch ops. On Linux, outputs above 32 k elements are shared among torch's threads (OpenMP, the
runtime torch itself loaded).

It is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja) into
$ACTSTEER_CACHE/kernels and loaded from there afterwards. Without a compiler, or with
ACTSTEER_FUSED_KERNEL=0, the hook uses torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from actsteer.cache import cache_dir

SOURCE = Path(__file__).parent / "transport.cpp"
#: OpenMP, for ATen's parallel_for to use threads (torch's own libgomp serves): on Linux, where
#: the compiler has it; elsewhere (Apple's clang lacks it) the kernel runs on one thread
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", *OPENMP]

log = logging.getLogger(__name__)


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags where Linux says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def fused_kernel() -> ModuleType | None:
    """The compiled kernel module (built on the first call if needed); None when switched off
    by ACTSTEER_FUSED_KERNEL=0 or where it cannot be built (then a warning says why).
    Hooks look it up when they are attached."""
    if os.environ.get("ACTSTEER_FUSED_KERNEL", "1") == "0":
        return None
    return _built_kernel()


@functools.cache
def _built_kernel() -> ModuleType | None:
    from torch.utils import cpp_extension

    key = "\n".join([SOURCE.read_text(), *FLAGS, torch.__version__, _cpu_identity()])
    name = f"actsteer_transport_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    build_dir = cache_dir() / "kernels" / name
    try:
        if not any(build_dir.glob(f"{name}*.so")):
            build_dir.mkdir(parents=True, exist_ok=True)
            log.warning(
                "actsteer: compiling the fused steering kernel once (≈ 30 s) in %s", build_dir
            )
        with _ninja_on_path():
            return cpp_extension.load(
                name,
                [str(SOURCE)],
                extra_cflags=FLAGS,
                extra_ldflags=OPENMP,
                build_directory=str(build_dir),
            )
    except Exception as error:  # no compiler or ninja, unwritable cache: keep the torch ops
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        warnings.warn(
            f"actsteer: could not build the fused steering kernel ({first_line}); steering "
            "hooks use plain torch ops (same results, slower). Install a C++ compiler and "
            "ninja, or set ACTSTEER_FUSED_KERNEL=0 to silence this.",
            stacklevel=2,
        )
        return None


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put the `ninja` of the PyPI package on PATH during a build if none is there."""
    saved = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, saved])
        except ImportError:
            pass
    try:
        yield
    finally:
        os.environ["PATH"] = saved
