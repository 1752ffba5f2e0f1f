"""The sender identity a campaign message leaves with: signed VERP return path and DKIM."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from recapito.config import Settings
from recapito.identity.dkim import DkimSigner
from recapito.identity.verp import DEFAULT_PREFIX, VerpKeyring, verp_address
from recapito.render.template import RenderedMessage


@dataclass(frozen=True)
class SenderIdentity:
    keyring: VerpKeyring
    signer: DkimSigner
    bounce_domain: str | None = None  # None: the sender's own domain
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def from_settings(cls, settings: Settings) -> SenderIdentity:
        """Keys from the settings (``ConfigError`` on a bad key: before anything is sent)."""
        return cls(
            keyring=VerpKeyring.from_settings(settings),
            signer=DkimSigner.from_settings(settings),
            bounce_domain=settings.bounce_domain,
        )

    def return_path(self, delivery_id: int, sender: str) -> str:
        domain = self.bounce_domain or sender.rpartition("@")[2]
        return verp_address(delivery_id, self.keyring, domain, self.prefix)

    def apply(self, message: RenderedMessage, delivery_id: int, sender: str) -> RenderedMessage:
        """The message with its VERP envelope sender, DKIM-signed when the sender's domain
        has a key (signed last: nothing changes the bytes after this)."""
        return dataclasses.replace(
            message,
            data=self.signer.sign(message.data, sender.rpartition("@")[2]),
            envelope_from=self.return_path(delivery_id, sender),
        )
