"""Which experts each token picks: score distributions, gating, placement and replication."""
