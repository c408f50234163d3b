"""``moesim schema``: print the JSON Schema of an input file kind (for YAML editors)."""

from __future__ import annotations

import argparse
import json

from moesim.config.plan import PlanSpec
from moesim.config.scenario import Scenario
from moesim.config.sweep import SweepSpec

NAME = "schema"
SCHEMAS = {"scenario": Scenario, "sweep": SweepSpec, "plan": PlanSpec}


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
    print(json.dumps(SCHEMAS[args.kind].model_json_schema(), indent=2))
    return 0
