"""DKIM keys of the sandbox's demo sender, and the TXT records that publish them.

``Sandbox.start`` makes (once, then reuses) one RSA-2048 and one Ed25519 key for
``world.SENDER_DOMAIN`` in ``<sandbox>/dkim/`` (mode 0600) and serves both as
``<selector>._domainkey.<domain> TXT "v=DKIM1; k=…; p=…"`` from its DNS server. Its settings
(``RECAPITO_DKIM_KEYS``) name the RSA key, the one every receiver checks, so every demo
message is signed and any verifier asking the sandbox DNS can check it; naming the Ed25519
key as well (``dkim_setting(keys, ("rsa-sha256", "ed25519-sha256"))``) signs with both
(RFC 8463 dual signing), at about 0.2 ms more a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from recapito.identity.dkim import DkimKey, generate_private_key_pem, load_key_file
from recapito.sandbox import world
from recapito.sandbox.dns import ZoneRecord, txt_record


@dataclass(frozen=True)
class SandboxDkimKey:
    key: DkimKey
    path: Path

    @property
    def setting(self) -> str:
        """This key's entry in ``RECAPITO_DKIM_KEYS``."""
        return f"{self.key.domain}:{self.key.selector}:{self.path}"

    def record(self) -> ZoneRecord:
        return txt_record(self.key.record_name, self.key.public_record())


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def ensure_dkim_keys(sandbox_dir: Path) -> list[SandboxDkimKey]:
    """The demo sender's DKIM keys, created the first time."""
    folder = sandbox_dir / "dkim"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys: list[SandboxDkimKey] = []
    for selector, algorithm in world.SENDER_DKIM_SELECTORS:
        path = folder / f"{world.SENDER_DOMAIN}.{selector}.pem"
        if not path.exists():
            _write_private(path, generate_private_key_pem(algorithm))
        keys.append(SandboxDkimKey(load_key_file(path, world.SENDER_DOMAIN, selector), path))
    return keys


def dkim_setting(
    keys: list[SandboxDkimKey], algorithms: tuple[str, ...] = world.SENDER_DKIM_SIGNING
) -> str:
    """``RECAPITO_DKIM_KEYS`` naming the keys of these algorithms."""
    return ",".join(k.setting for k in keys if k.key.algorithm in algorithms)
