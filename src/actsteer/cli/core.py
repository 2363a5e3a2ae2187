"""The one Typer app, its argv normaliser and error handling, and what every command shares.

Every user error (bad option, missing file, ActSteerError) ends in one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from actsteer.errors import ActSteerError

if TYPE_CHECKING:
    from actsteer.steering import Steering

STRENGTH_FLAGS = ("--strength", "-s")

# the help panels grouping the commands by topic
LM_PANEL = "Language models"
IMAGE_PANEL = "Text-to-image pipelines"
EVAL_PANEL = "Evaluation"
FILES_PANEL = "Steering files"


# ---------------------------------------------------------------------------------------------
# argv normalisation and one-line errors


def is_number(token: str) -> bool:
    """Whether a token reads as a float (a λ value rather than the next option or a prompt)."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def normalise_argv(args: Sequence[str]) -> list[str]:
    """Let one --strength flag take several numbers: `--strength 0 0.5 1`.

    Tokens right after --strength (or -s, or --strength=X) that parse as floats become repeated
    `--strength X` options. `--` ends options, so a prompt that looks like a number goes after it.
    """
    args = list(args)
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        out.append(token)
        i += 1
        if token in STRENGTH_FLAGS:
            if i < len(args):  # the flag's own value, whatever it is (typer checks it)
                out.append(args[i])
                i += 1
        elif not token.startswith("--strength="):
            continue
        while i < len(args) and is_number(args[i]):
            out += ["--strength", args[i]]
            i += 1
    return out


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` as one line on stderr; return the Exit to raise."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    return typer.Exit(code)


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show a warning as one `warning: …` line on stderr, without the source location."""
    typer.echo(f"warning: {_one_line(str(message)).removeprefix('actsteer: ')}", err=True)


class _Group(TyperGroup):
    """The app's group: normalises argv and turns every user error into one stderr line."""

    def main(self, args: Sequence[str] | None = None, *pargs: Any, **kwargs: Any) -> Any:
        args = sys.argv[1:] if args is None else args
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return super().main(normalise_argv(args), *pargs, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except typer.TyperException as err:
            raise self._usage_error(err) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException as err:
            raise self._usage_error(err) from None
        except ActSteerError as err:  # also from an option's check, while parsing
            raise fail(str(err)) from None
        except FileNotFoundError as err:
            name = err.filename if err.filename is not None else str(err)
            raise fail(f"file not found: {name}") from None

    @staticmethod
    def _usage_error(err: typer.TyperException) -> Exception:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `actsteer`: show the help
            return err
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return fail(err.format_message() + hint, getattr(err, "exit_code", 2))


def _print_version(value: bool) -> None:
    if value:
        from actsteer.version import __version__

        typer.echo(f"actsteer {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=_Group,
    name="actsteer",
    help=(
        "Steer Hugging Face causal LMs by transporting activations (AcT). "
        "Fit a steering from a source and a target text file, then generate with a strength "
        "λ in [0, 1]: 0 is the untouched model, 1 the full transport. "
        "Try `actsteer demo` first."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """The options of `actsteer` itself (before a command)."""


# ---------------------------------------------------------------------------------------------
# what the commands share


def console(stderr: bool = False) -> Console:
    """A rich console; wide when not a terminal, so piped tables don't wrap at 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False)


def selected(steering: Steering, modules: str | None) -> Steering:
    """The steering narrowed to --modules PATTERN (as it is without one)."""
    return steering if modules is None else steering.select(modules)


def status(message: str) -> None:
    """A progress line on stderr (stdout keeps the results)."""
    typer.echo(message, err=True)


def renamed_steps(old: int | None, new: int | None, new_option: str) -> int | None:
    """The value of --steps, the old name of `new_option` (with a warning on stderr), or the
    new option's value; both given is an error."""
    if old is None:
        return new
    if new is not None:
        raise ActSteerError(f"give {new_option} only (--steps is its old name)")
    status(f"warning: --steps is now {new_option}; the old spelling goes away in the next release")
    return old


def read_texts(path: str | Path, what: str = "texts", field: str | None = None) -> list[str]:
    """The texts of a .txt (one per line), .jsonl or .csv file (`field`) or an hf: dataset
    (see actsteer.texts); anything missing or malformed is a clear error."""
    from actsteer.texts import read_texts as read

    return read(str(path), what, field)


def load_lm(name: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """The model and tokenizer called `name` (see actsteer.models.model_for) on `device` in
    `dtype`, with a status line."""
    placed = "" if (device, dtype) == ("cpu", "float32") else f" ({device}, {dtype})"
    status(f"Loading model {name}{placed} …")
    return load_model(name, device=device, dtype=dtype)


def load_model(name: str, *, device: str, dtype: str) -> tuple[Any, Any]:
    """actsteer.models.load_model, imported when a command first needs it (not for --help)."""
    from actsteer import models

    return models.load_model(name, device=device, dtype=dtype)
