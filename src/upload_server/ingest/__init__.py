"""Ingest: archive checks, extraction of events and actors (in worker processes), merging of results."""
