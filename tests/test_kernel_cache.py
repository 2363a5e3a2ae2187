"""The kernel cache: keyed by everything a build depends on, every build announced, one build
for two processes asking at once (a file lock), an interrupted build redone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actsteer import kernels

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

#: a Python extension without torch's headers: it compiles in about a second
TINY = """
#include <Python.h>
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
    PyObject* module = PyModule_Create(&tiny);
    PyModule_AddIntConstant(module, "answer", ANSWER);
    return module;
}
"""

BUILDER = """
import sys, time
from pathlib import Path
import torch  # the import a real caller has done already
from actsteer import kernels
barrier = Path(sys.argv[2])
barrier.touch()
while len(list(barrier.parent.glob("ready-*"))) < int(sys.argv[3]):
    time.sleep(0.01)
module = kernels.build("tiny", Path(sys.argv[1]), ["-DANSWER=42"], [])
print(module.answer)
"""


def build_in_processes(source: Path, cache: Path, count: int) -> list[subprocess.CompletedProcess]:
    """Run `count` processes that start building `source` at the same moment."""
    script = cache / "builder.py"
    script.write_text(BUILDER)
    for stale in cache.glob("ready-*"):
        stale.unlink()
    env = {**os.environ, "ACTSTEER_CACHE": str(cache)}
    runs = [
        subprocess.Popen(
            [sys.executable, str(script), str(source), str(cache / f"ready-{i}"), str(count)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(run.args, run.returncode, out, err))
    return results


def test_two_processes_build_once_and_both_use_it(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(textwrap.dedent(TINY))
    runs = build_in_processes(source, tmp_path, 2)
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    assert [run.stdout.strip() for run in runs] == ["42", "42"]
    announced = [run.stderr.count("actsteer: compiling tiny.cpp") for run in runs]
    assert sorted(announced) == [0, 1], "one process builds (and says so), the other waits"
    (folder,) = (tmp_path / "kernels").glob("tiny_*/")
    record = json.loads((folder / "build.json").read_text())
    assert record["python"] == str(Path(sys.executable).resolve())
    assert record["prefix"] == sys.prefix
    assert len(list(folder.glob("*.so"))) == 1


def test_a_later_call_imports_the_build_and_an_interrupted_one_is_redone(
    monkeypatch, tmp_path, capfd
):
    monkeypatch.setenv("ACTSTEER_CACHE", str(tmp_path))
    source = tmp_path / "tiny.cpp"
    source.write_text(textwrap.dedent(TINY))
    assert kernels.build("tiny", source, ["-DANSWER=7"], []).answer == 7
    assert capfd.readouterr().err.count("actsteer: compiling tiny.cpp") == 1
    (folder,) = (tmp_path / "kernels").glob("tiny_*/")
    # imported from the cache, without compiling and without asking torch's builder
    monkeypatch.setattr("torch.utils.cpp_extension.load", None)
    assert kernels.build("tiny", source, ["-DANSWER=7"], []).answer == 7
    assert "compiling" not in capfd.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("ACTSTEER_CACHE", str(tmp_path))
    # an interrupted build (the folder without its record) is redone, and says so
    (folder / "build.json").unlink()
    assert kernels.build("tiny", source, ["-DANSWER=7"], []).answer == 7
    assert capfd.readouterr().err.count("compiling tiny.cpp") == 1
    # another source is another build, announced too
    source.write_text(textwrap.dedent(TINY) + "// changed\n")
    assert kernels.build("tiny", source, ["-DANSWER=7"], []).answer == 7
    assert "compiling tiny.cpp" in capfd.readouterr().err
    assert len(list((tmp_path / "kernels").glob("tiny_*/"))) == 2


def test_the_key_covers_what_the_build_depends_on(monkeypatch, tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    base = kernels.build_key(source, ["-O3"], [])
    assert set(base) >= {"source", "flags", "python", "prefix", "torch", "torch_build"}
    assert set(base) >= {"cxx11_abi", "compiler", "cpu", "extension_suffix"}
    monkeypatch.setattr(sys, "executable", "/another/venv/bin/python")
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    other_env = kernels.build_key(source, ["-O3"], [])
    assert other_env["python"] != base["python"] and other_env["prefix"] != base["prefix"]
    monkeypatch.undo()
    alias = tmp_path / "python3"  # `python` and `python3` in one venv: one build, not two
    alias.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(alias))
    assert kernels.build_key(source, ["-O3"], []) == base
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++-that-is-not-here")
    assert kernels.build_key(source, ["-O3"], [])["compiler"] != base["compiler"]
    monkeypatch.delenv("CXX")
    assert kernels.build_key(source, ["-O2"], [])["flags"] != base["flags"]
