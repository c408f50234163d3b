"""``moesim schema``: print the JSON Schema of an input file kind (for YAML editors)."""

from __future__ import annotations

import argparse
import importlib
import json

NAME = "schema"
SCHEMAS = {
    "scenario": "moesim.config.scenario:Scenario",
    "sweep": "moesim.config.sweep:SweepSpec",
    "plan": "moesim.config.plan:PlanSpec",
}
"""File kind -> its input model (module:class, imported only when printed)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim schema``."""
    p = subparsers.add_parser(
        NAME,
        help="print the JSON Schema of scenario, sweep or plan files (for YAML editors)",
        description="Print the JSON Schema of one input file kind. Point your editor's "
        "YAML language server at it for completion and validation.",
    )
    p.add_argument(
        "kind",
        nargs="?",
        choices=list(SCHEMAS),
        default="scenario",
        help="which file kind (default scenario)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Print the schema as indented JSON."""
    module, name = SCHEMAS[args.kind].split(":")
    model = getattr(importlib.import_module(module), name)
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0
