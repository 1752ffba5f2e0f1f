"""The local mail world used by ``make demo`` and by the tests (DESIGN §12)."""
