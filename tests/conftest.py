"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from recapito.sandbox.runtime import Sandbox


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The sandbox mail world (DNS + every MX posture) on free loopback ports, once per run.

    Its home is a temporary directory; point code at it with ``sandbox.env()`` (or
    ``Settings.load(env={**os.environ, "RECAPITO_HOME": str(sandbox.home)})``, which picks up
    the ``settings.json`` it wrote). Tests share it: use recipient addresses of your own.
    """
    home = tmp_path_factory.mktemp("sandbox-home")
    with Sandbox(home) as box:
        yield box


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect test server for the whole run (start-up is ~25 s here)."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
