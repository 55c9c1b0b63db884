"""Data shipped with llmq: the built-in calibration text (`llmq.calib`)."""
