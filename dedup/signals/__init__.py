"""Signals: functions from a batch of samples to feature columns."""
