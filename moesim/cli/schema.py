"""``moesim schema``: print the JSON Schema of an input file kind (for YAML editors)."""

from __future__ import annotations

import argparse
import json

from moesim.config.scenario import Scenario

NAME = "schema"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim schema``."""
    p = subparsers.add_parser(
        NAME,
        help="print the scenario JSON Schema (for YAML editors)",
        description="Print the scenario JSON Schema. Point your editor's "
        "YAML language server at it for completion and validation.",
    )
    return p


def run(args: argparse.Namespace) -> int:
    print(json.dumps(Scenario.model_json_schema(), indent=2))
    return 0
