"""Architecture rules that must hold however the code grows."""

from __future__ import annotations

import subprocess
import sys


def test_core_does_not_import_prefect() -> None:
    code = (
        "import sys, pkgutil, importlib, recapito\n"
        "for m in pkgutil.walk_packages(recapito.__path__, 'recapito.'):\n"
        "    if m.name in ('recapito.cli', 'recapito.demo') or '.migrations' in m.name:\n"
        "        continue\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'prefect' or n.startswith('prefect.'))\n"
        "print(len(bad)); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_imports_without_prefect() -> None:
    code = "import sys, recapito.cli; sys.exit(1 if 'prefect' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
