"""The package's version (``moesim --version``), kept equal to pyproject.toml's by a test
(reading it from the installed metadata costs a quarter of a second at start-up)."""

__version__ = "0.1.0"
