"""Cross-validation: a real MoE layer in numpy, timing validation, host calibration."""
