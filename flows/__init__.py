"""Deployable Prefect flows: orchestration only."""
