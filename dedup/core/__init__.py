"""Errors and exit codes, settings, progress: what every layer may use."""
