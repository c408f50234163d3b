"""Interconnect: topology graphs with vectorised routing, and the fluid max-min fair network."""

from moesim.network.fluid import FluidNetwork, maxmin_rates
from moesim.network.topology import Topology, build_topology

__all__ = ["FluidNetwork", "Topology", "build_topology", "maxmin_rates"]
