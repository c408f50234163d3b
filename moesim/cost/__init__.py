"""Physics with no time ordering: per-op FLOPs and bytes, roofline and kernel tables, PIM op
costs."""
