"""A fused CPU kernel for the one transport (actsteer.transport), built once per machine.

With a bounded support (the default q0-100) the transport computes ω̃·a + λβ inside per-unit
open bounds and keeps a outside them. As separate torch ops that is five passes and as many
dispatches, several times the cost of the unbounded map at decoding sizes; transport.cpp does it
in one pass, bit for bit the same result. It applies per-channel maps to (B, C, H, W) outputs
without broadcasting, computes ω̃ and λβ itself for one λ per token (an engine's flattened
batch), and overwrites a norm's fresh output that no other hook has seen, saving an allocation.
It also applies quantile-act's piecewise maps (`knot_tokens`, and `knot_hook` bound like
`hook`: each element's segment counted a knot level at a time, 10× the torch ops' speed on a
(200, 576) output).
Support "all" passes infinite bounds. The kernel is called through CPython's fast calling
convention rather than pybind11: inside a model, where caches are cold, pybind11's dispatch cost
more than the arithmetic. `hook(...)` binds a map's coefficients, checked once, into a forward
hook implemented in C++, so no Python frame runs per call (`gated_hook(...)` likewise computes a
gate and the transport at λ·g); what it does not handle (other
devices or dtypes, non-contiguous outputs, a gradient to carry, tensor subclasses, tuple
outputs, shapes that do not fit) goes to the Python hook and the transport's torch ops. On
Linux, outputs above 32 k elements are shared among torch's threads (OpenMP, the runtime torch
itself loaded).

It is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja) into
$ACTSTEER_CACHE/kernels, in a folder named by a hash of everything the build depends on (the
source, the flags, the interpreter and its environment, torch's version, build and C++ ABI, the
compiler, the CPU), and imported from there afterwards without asking the builder again. Every
build says so on stderr; a file lock makes a second process wait for a build under way and then
use it. It is opt-in: the `cpu-kernel` extra (`pip install "actsteer[cpu-kernel]"`, which
brings ninja) or ACTSTEER_FUSED_KERNEL=1 turns it on. Without it, without a compiler, or with
ACTSTEER_FUSED_KERNEL=0, the transport uses torch ops (bit for bit the same results).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from actsteer.cache import cache_dir, file_lock

SOURCE = Path(__file__).parent / "transport.cpp"
#: OpenMP, for ATen's parallel_for to use threads (torch's own libgomp serves): on Linux, where
#: the compiler has it; elsewhere (Apple's clang lacks it) the kernel runs on one thread
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", *OPENMP]


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags where Linux says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def fused_kernel() -> ModuleType | None:
    """The compiled kernel module (built on the first call if needed), where it is opted into;
    else None, and the transport runs torch ops.

    Opted into: the `cpu-kernel` extra is installed (it brings the `ninja` package), or
    ACTSTEER_FUSED_KERNEL=1; ACTSTEER_FUSED_KERNEL=0 switches it off. Where it cannot be built
    (no C++ compiler), a warning says why, once."""
    switch = os.environ.get("ACTSTEER_FUSED_KERNEL")
    if switch == "0" or (switch != "1" and not _extra_installed()):
        return None
    return _built_kernel()


@functools.cache
def _extra_installed() -> bool:
    """Whether the `cpu-kernel` extra's build tool (the `ninja` package) is installed."""
    return importlib.util.find_spec("ninja") is not None


def _compiler() -> str:
    """The C++ compiler torch's builder runs ($CXX, else c++), resolved, with its size and
    modification time: an upgraded compiler is another build."""
    command = os.environ.get("CXX", "c++")
    found = shutil.which(command)
    if found is None:
        return command
    resolved = Path(found).resolve()
    stat = resolved.stat()
    return f"{command} -> {resolved} ({stat.st_size} bytes, {stat.st_mtime_ns})"


def build_key(source: Path, flags: list[str], ldflags: list[str]) -> dict[str, str]:
    """Everything a build of `source` depends on, by name: its bytes, the flags, the
    interpreter and its environment (torch's builder writes their paths into the build), torch's
    version, build configuration and C++ ABI, the compiler and the CPU."""
    return {
        "source": hashlib.sha256(source.read_bytes()).hexdigest(),
        "flags": " ".join(flags),
        "ldflags": " ".join(ldflags),
        "python": str(Path(sys.executable).resolve()),  # python and python3: one build
        "prefix": sys.prefix,
        "python_version": sys.version,
        "extension_suffix": str(sysconfig.get_config_var("EXT_SUFFIX")),
        "torch": f"{torch.__version__} {torch.version.git_version}",
        "torch_path": str(Path(torch.__file__).parent),
        "torch_build": torch.__config__.show(),
        "cxx11_abi": str(torch.compiled_with_cxx11_abi()),
        "compiler": _compiler(),
        "cpu": _cpu_identity(),
    }


def build(prefix: str, source: Path, flags: list[str], ldflags: list[str]) -> ModuleType:
    """The extension module compiled from `source`, built once per build key into
    $ACTSTEER_CACHE/kernels/<prefix>_<hash> (a line on stderr each time it builds) and imported
    from there afterwards. Concurrent callers wait on a file lock, so one builds and the others
    import its result; a folder without a completed build (an interrupted one) is built anew."""
    from torch.utils import cpp_extension

    key = build_key(source, flags, ldflags)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{prefix}_{digest}"
    folder = cache_dir() / "kernels" / name
    done = folder / "build.json"  # written last: the build in the folder is complete
    if not done.exists():
        with file_lock(folder.parent / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                print(f"actsteer: compiling {source.name} (≈ 30 s) in {folder}", file=sys.stderr)
                with _ninja_on_path():
                    module = cpp_extension.load(
                        name,
                        [str(source)],
                        extra_cflags=flags,
                        extra_ldflags=ldflags,
                        build_directory=str(folder),
                    )
                record = {"library": Path(str(module.__file__)).name, **key}
                scratch = done.with_suffix(".tmp")
                scratch.write_text(json.dumps(record, indent=1))
                os.replace(scratch, done)
                return module
    library = folder / json.loads(done.read_text())["library"]
    spec = importlib.util.spec_from_file_location(library.name.split(".")[0], library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _built_kernel() -> ModuleType | None:
    try:
        return build("actsteer_transport", SOURCE, FLAGS, OPENMP)
    except Exception as error:  # no compiler or ninja, unwritable cache: keep the torch ops
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        warnings.warn(
            f"actsteer: could not build the fused steering kernel ({first_line}); steering "
            "hooks use plain torch ops (same results, slower). Install a C++ compiler, or set "
            "ACTSTEER_FUSED_KERNEL=0 to silence this.",
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
