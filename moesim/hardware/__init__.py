"""Device cost models: time of a kernel from its FLOPs and bytes."""

from moesim.hardware.roofline import kernel_time_s, op_time_s

__all__ = ["kernel_time_s", "op_time_s"]
