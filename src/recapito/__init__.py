"""recapito: secure, provable campaign delivery.

The core package never imports Prefect: flows and tasks live in their own packages
and call into this one.
"""

__version__ = "0.1.0"
