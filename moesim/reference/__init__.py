"""A real MoE layer in numpy (float32), forward and backward, for cross-validation."""

from moesim.reference.layer import MoELayer, ReferenceRouting, make_layer

__all__ = ["MoELayer", "ReferenceRouting", "make_layer"]
