"""`python -m actsteer …`: the command line, as the `actsteer` script runs it."""

from actsteer.cli import app

app(prog_name="actsteer")
