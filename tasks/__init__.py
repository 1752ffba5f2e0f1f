"""Thin Prefect task wrappers around the recapito core."""
