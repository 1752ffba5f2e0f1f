"""Settings: environment first, then the sandbox's settings file, then defaults.

``RECAPITO_HOME``        working directory for state (default ``./var``)
``RECAPITO_DB_URL``      ledger URL (default SQLite file ``$RECAPITO_HOME/recapito.db``)
``RECAPITO_DNS``         ``HOST:PORT`` of the resolver to ask (default: the system resolver)
``RECAPITO_MX_PORT``     TCP port of recipient MX servers (default 25)
``RECAPITO_TLS_CA_FILE`` extra trust anchors (PEM) added to the system store
``RECAPITO_HELO_NAME``   FQDN used in EHLO (default: the host's FQDN)
``RECAPITO_HTTPS_PORT``  port of MTA-STS policy hosts (default 443)
``RECAPITO_DANE_RESOLVER`` ``HOST:PORT`` of a local validating resolver whose AD bit is trusted;
                         when set, every lookup goes through it and DANE is checked
``RECAPITO_VERP_KEYS``   ``id:secret,id:secret`` keys of the signed VERP return path (the first
                         signs, all verify); secret, never logged
``RECAPITO_VERP_KEYS_FILE`` a file of ``id:secret`` lines, instead of the variable; with
                         neither, a key is generated in ``$RECAPITO_HOME/secrets/verp-keys`` (0600)
``RECAPITO_BOUNCE_DOMAIN`` domain of the VERP return path (default: the sender's domain)
``RECAPITO_DKIM_KEYS``   ``domain:selector:/path/key.pem`` entries (comma-separated): DKIM keys
``RECAPITO_TRACKING_URL`` public base URL of the tracking service (``recapito tracking serve``),
                         e.g. ``https://t.bank.example``: links are rewritten to it, the open
                         pixel and the one-click unsubscribe URL point at it; unset: no
                         tracking, and ``List-Unsubscribe`` carries the mailto: form only
``RECAPITO_TRACKING_KEYS`` ``id:secret,…`` keys of the tracking tokens (the first signs, all
                         verify); secret, never logged
``RECAPITO_TRACKING_KEYS_FILE`` a file of ``id:secret`` lines; with neither, a key is
                         generated in ``$RECAPITO_HOME/secrets/tracking-keys`` (0600)
``RECAPITO_EXPORT_KEYS`` ``id:secret,…`` keys of the pseudonymous contact keys in the
                         data-cleaning exports (the first one keys); secret, never logged
``RECAPITO_EXPORT_KEYS_FILE`` a file of ``id:secret`` lines; with neither, a key is
                         generated in ``$RECAPITO_HOME/secrets/export-keys`` (0600)

``recapito sandbox up`` writes ``$RECAPITO_HOME/sandbox/settings.json`` with the values that
point the CLI and the flows at the local mail world; explicit environment variables win.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from recapito.errors import ConfigError

SETTING_NAMES = (
    "RECAPITO_DB_URL",
    "RECAPITO_DNS",
    "RECAPITO_MX_PORT",
    "RECAPITO_TLS_CA_FILE",
    "RECAPITO_HELO_NAME",
    "RECAPITO_HTTPS_PORT",
    "RECAPITO_DANE_RESOLVER",
    "RECAPITO_VERP_KEYS",
    "RECAPITO_VERP_KEYS_FILE",
    "RECAPITO_BOUNCE_DOMAIN",
    "RECAPITO_DKIM_KEYS",
    "RECAPITO_TRACKING_URL",
    "RECAPITO_TRACKING_KEYS",
    "RECAPITO_TRACKING_KEYS_FILE",
    "RECAPITO_EXPORT_KEYS",
    "RECAPITO_EXPORT_KEYS_FILE",
)


def home_dir() -> Path:
    return Path(os.environ.get("RECAPITO_HOME", "var")).resolve()


def sandbox_dir(home: Path | None = None) -> Path:
    return (home or home_dir()) / "sandbox"


def sandbox_settings_path(home: Path | None = None) -> Path:
    return sandbox_dir(home) / "settings.json"


def _sandbox_settings(home: Path) -> dict[str, str]:
    path = sandbox_settings_path(home)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable sandbox settings ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: sandbox settings must be a JSON object")
    return {str(k): str(v) for k, v in data.items() if k in SETTING_NAMES}


def parse_hostport(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _check_home(home: Path) -> None:
    """The state directory must be a directory, or creatable where it is."""
    if home.exists():
        if not home.is_dir():
            raise ConfigError(f"RECAPITO_HOME={home}: not a directory")
        return
    parent = home.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"RECAPITO_HOME={home}: cannot be created under {parent}")


def _check_sqlite_directory(url: str) -> None:
    """An explicit SQLite ledger must be in an existing directory: a typo in the path must
    not start an empty ledger (that would send a whole campaign again)."""
    if not url.startswith("sqlite:"):
        return
    path = url.split(":///", 1)[-1].split("?", 1)[0]
    if path and path != ":memory:" and not Path(path).parent.is_dir():
        raise ConfigError(
            f"RECAPITO_DB_URL={url}: directory {Path(path).parent} does not exist "
            "(create it first if this is really a new ledger)"
        )


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    dns: tuple[str, int] | None
    mx_port: int
    tls_ca_file: Path | None
    helo_name: str
    https_port: int = 443
    dane_resolver: tuple[str, int] | None = None
    verp_keys: str | None = field(default=None, repr=False)  # secret
    verp_keys_file: Path | None = None
    bounce_domain: str | None = None
    dkim_keys: str | None = None
    tracking_url: str | None = None
    tracking_keys: str | None = field(default=None, repr=False)  # secret
    tracking_keys_file: Path | None = None
    export_keys: str | None = field(default=None, repr=False)  # secret
    export_keys_file: Path | None = None

    @classmethod
    def load(cls, env: dict[str, str] | None = None) -> Settings:
        environ = dict(os.environ if env is None else env)
        home = Path(environ.get("RECAPITO_HOME", "var")).resolve()
        merged = {
            **_sandbox_settings(home),
            **{k: environ[k] for k in SETTING_NAMES if environ.get(k)},
        }
        _check_home(home)
        db_url = merged.get("RECAPITO_DB_URL") or f"sqlite:///{home / 'recapito.db'}"
        if merged.get("RECAPITO_DB_URL"):
            _check_sqlite_directory(db_url)
        dns = (
            parse_hostport(merged["RECAPITO_DNS"], "RECAPITO_DNS")
            if merged.get("RECAPITO_DNS")
            else None
        )
        port_text = merged.get("RECAPITO_MX_PORT", "25")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"RECAPITO_MX_PORT={port_text!r}: expected a TCP port number")
        ca = merged.get("RECAPITO_TLS_CA_FILE")
        ca_path = Path(ca) if ca else None
        if ca_path is not None and not ca_path.is_file():
            raise ConfigError(f"RECAPITO_TLS_CA_FILE={ca}: no such file")
        helo = merged.get("RECAPITO_HELO_NAME") or socket.getfqdn() or "localhost.localdomain"
        https_text = merged.get("RECAPITO_HTTPS_PORT", "443")
        if not https_text.isdigit() or not 0 < int(https_text) < 65536:
            raise ConfigError(f"RECAPITO_HTTPS_PORT={https_text!r}: expected a TCP port number")
        dane_text = merged.get("RECAPITO_DANE_RESOLVER")
        dane = parse_hostport(dane_text, "RECAPITO_DANE_RESOLVER") if dane_text else None
        verp_file_text = merged.get("RECAPITO_VERP_KEYS_FILE")
        verp_file = Path(verp_file_text) if verp_file_text else None
        if verp_file is not None and not verp_file.is_file():
            raise ConfigError(f"RECAPITO_VERP_KEYS_FILE={verp_file_text}: no such file")
        bounce_domain = (merged.get("RECAPITO_BOUNCE_DOMAIN") or "").strip().lower() or None
        if bounce_domain is not None and (
            "." not in bounce_domain
            or "@" in bounce_domain
            or any(c.isspace() for c in bounce_domain)
        ):
            raise ConfigError(f"RECAPITO_BOUNCE_DOMAIN={bounce_domain!r}: expected a domain name")
        tracking_url = (merged.get("RECAPITO_TRACKING_URL") or "").strip().rstrip("/") or None
        if tracking_url is not None and (
            not tracking_url.lower().startswith(("https://", "http://"))
            or any(c.isspace() or c in "\"'<>\\" for c in tracking_url)
            or "?" in tracking_url
            or "#" in tracking_url
        ):
            raise ConfigError(
                f"RECAPITO_TRACKING_URL={tracking_url!r}: expected a base URL such as "
                "https://t.example.com"
            )
        tracking_file_text = merged.get("RECAPITO_TRACKING_KEYS_FILE")
        tracking_file = Path(tracking_file_text) if tracking_file_text else None
        if tracking_file is not None and not tracking_file.is_file():
            raise ConfigError(f"RECAPITO_TRACKING_KEYS_FILE={tracking_file_text}: no such file")
        export_file_text = merged.get("RECAPITO_EXPORT_KEYS_FILE")
        export_file = Path(export_file_text) if export_file_text else None
        if export_file is not None and not export_file.is_file():
            raise ConfigError(f"RECAPITO_EXPORT_KEYS_FILE={export_file_text}: no such file")
        return cls(
            home=home,
            db_url=db_url,
            dns=dns,
            mx_port=int(port_text),
            tls_ca_file=ca_path,
            helo_name=helo,
            https_port=int(https_text),
            dane_resolver=dane,
            verp_keys=merged.get("RECAPITO_VERP_KEYS") or None,
            verp_keys_file=verp_file,
            bounce_domain=bounce_domain,
            dkim_keys=merged.get("RECAPITO_DKIM_KEYS") or None,
            tracking_url=tracking_url,
            tracking_keys=merged.get("RECAPITO_TRACKING_KEYS") or None,
            tracking_keys_file=tracking_file,
            export_keys=merged.get("RECAPITO_EXPORT_KEYS") or None,
            export_keys_file=export_file,
        )
