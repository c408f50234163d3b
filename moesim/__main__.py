"""``python -m moesim`` is the ``moesim`` command."""

from moesim.cli import run_as_program

run_as_program()
