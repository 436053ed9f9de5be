"""Measurement harness: quality against the float reference, and speed / memory in a clean process."""
