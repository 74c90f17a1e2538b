"""Run tasks over parts: in local worker processes or on a Ray cluster."""
