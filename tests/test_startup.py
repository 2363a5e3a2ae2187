"""Start-up: `import actsteer` and the CLI's --help and `methods` import no heavy stack.

Timing is measured in benchmarks/startup.py; here the imported modules are checked, which is
what the time depends on.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: never imported by `import actsteer`
HEAVY = ("diffusers", "scipy", "matplotlib", "sklearn", "datasets", "actsteer.evaluation")
#: also not imported to build the command line or answer --help / methods
HEAVY_CLI = (*HEAVY, "torch", "transformers", "numpy", "safetensors", "actsteer.steering")

PROBE = """
import json, sys
{code}
print(json.dumps(sorted(sys.modules)))
"""


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in modules or any(m.startswith(n + ".") for m in modules))


def test_import_actsteer_pulls_in_no_heavy_stack():
    assert heavy(imported_after("import actsteer"), HEAVY_CLI) == []


@pytest.mark.parametrize(
    "args", [["--help"], ["methods"], ["fit", "--help"], ["calibrate", "--help"]]
)
def test_the_cli_answers_without_torch(args):
    code = (
        "import contextlib, io\n"
        "from actsteer.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        f"        app({args!r})\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "assert 'linear-act' in out.getvalue() or 'Usage' in out.getvalue()\n"
    )
    assert heavy(imported_after(code), HEAVY_CLI) == []


def test_public_names_load_when_used():
    code = (
        "import actsteer\n"
        "import actsteer.fitting\n"  # the module is fitting, the function fit
        "assert callable(actsteer.fit) and actsteer.fit.__module__ == 'actsteer.fitting'\n"
        "assert actsteer.Steering.__name__ == 'Steering'\n"
        "from actsteer import calibrate, load_model, steered\n"
    )
    modules = imported_after(code)
    assert "torch" in modules and heavy(modules, ("diffusers", "matplotlib")) == []


def test_an_unknown_name_is_an_attribute_error():
    import actsteer

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        actsteer.nope  # noqa: B018
