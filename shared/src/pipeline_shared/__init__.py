"""Shared parts of the email pipeline: event contracts, topology and messaging."""
