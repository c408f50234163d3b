"""Studies over many scenarios: one run, sweeps, capacity plans."""
