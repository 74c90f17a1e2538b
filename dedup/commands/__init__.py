"""What the CLI runs: a run, fan-out parts, calibrate, index; each drives the
engine through its public functions."""
