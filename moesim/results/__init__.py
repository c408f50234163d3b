"""Results of a run: summary, tidy tables, trace.json, energy."""
