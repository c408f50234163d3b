"""Defaults that depend on other fields, resolved once into a separate object: the frozen
input models keep what the user wrote (``None`` where a default applies).

- ``dp = devices / tp`` and ``edp = devices / (ep x etp)``, devices of one pipeline stage;
- the intra-node fabric and link from the device's catalog entry, one NIC per device, every
  node under one leaf switch;
- the PIM units' compute dtype: the workload's.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim import catalog
from moesim.config.scenario import ClusterConfig, Scenario, TopologyConfig


@dataclass(frozen=True)
class Resolved:
    """What ``resolve`` fills in for one scenario."""

    dp: int
    edp: int
    topology: TopologyConfig
    pim_compute_dtype: str | None

    def as_dict(self) -> dict:
        return {
            "dp": self.dp,
            "edp": self.edp,
            "topology": self.topology.model_dump(mode="json"),
            "pim_compute_dtype": self.pim_compute_dtype,
        }


def resolved_topology(cluster: ClusterConfig, topo: TopologyConfig) -> TopologyConfig:
    """``topo`` with every default filled from the cluster and its device (a new object)."""
    dev = cluster.device
    return topo.model_copy(
        update={
            "intra_node": topo.intra_node or dev.intra_node_topology,
            "intra_node_link": topo.intra_node_link or catalog.link(dev.intra_node_link),
            "nics_per_node": topo.nics_per_node or cluster.devices_per_node,
            "nodes_per_leaf": topo.nodes_per_leaf or cluster.nodes,
        }
    )


def resolve(sc: Scenario) -> Resolved:
    """The resolved defaults of ``sc``."""
    par = sc.parallelism
    n = sc.cluster.n_devices // par.pp  # the devices of one pipeline stage
    pim_dtype = None
    if sc.pim is not None:
        pim_dtype = sc.pim.compute_dtype or sc.workload.dtypes.compute
    return Resolved(
        dp=n // par.tp,
        edp=n // (par.ep * par.etp),
        topology=resolved_topology(sc.cluster, sc.topology),
        pim_compute_dtype=pim_dtype,
    )
