"""PEC tasks: mailbox blocks, shared per-mailbox limits, the PEC chunk task, credential checks.

``PecMailboxBlock`` is the Prefect block of one sender PEC mailbox (the password a
``SecretStr``, never a parameter, a log line or an artifact). The core gets plain
``recapito.pec.mailboxes.PecMailbox`` objects. Every worker of every host shares each
mailbox's limits through two Prefect global concurrency limits:
``recapito-pec-rate-<mailbox>`` (slot decay = messages per second) and
``recapito-pec-conn-<mailbox>`` (concurrent SMTP connections).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.core import Block
from prefect.concurrency.sync import concurrency, rate_limit
from prefect.context import TaskRunContext
from pydantic import Field, SecretStr

from recapito import campaign as core
from recapito.config import Settings
from recapito.pec.campaign import deliver_pec_chunk as core_deliver_pec_chunk
from recapito.pec.campaign import resolve_mailboxes
from recapito.pec.mailboxes import (
    PecMailbox,
    expiring_credentials,
    expiry_markdown,
)
from recapito.pec.submit import ConnectionGate, MailboxPermits
from tasks.campaign import ensure_global_limit, transient_only


class PecMailboxBlock(Block):
    """A sender PEC mailbox: SMTPS submission, IMAPS receipts, the provider's limits."""

    _block_type_name = "recapito PEC mailbox"
    _description = "A PEC mailbox recapito submits through and collects receipts from."

    address: str = Field(description="The mailbox address (From and MAIL FROM)")
    smtp_host: str = Field(description="SMTPS host (implicit TLS), e.g. smtps.pec.aruba.it")
    smtp_port: int = Field(465)
    imap_host: str | None = Field(None, description="IMAPS host, e.g. imaps.pec.aruba.it")
    imap_port: int = Field(993)
    username: str = Field(description="Login (usually the address)")
    password: SecretStr = Field(description="Password or app password")
    per_minute: float = Field(6, gt=0, description="Messages a minute (provider contract)")
    per_day: int | None = Field(None, ge=1, description="Messages a day")
    connections: int = Field(1, ge=1, le=20, description="Concurrent SMTP connections")
    max_size: int = Field(30 * 1024 * 1024, ge=1, description="Bytes a message (x recipients)")
    receipt_kind: str = Field("breve", description="completa, breve or sintetica")
    credential_expires: dt.date | None = Field(None, description="When the password expires")
    ca_file: str | None = Field(None, description="Extra CA bundle (PEM) to trust")

    def to_mailbox(self, name: str) -> PecMailbox:
        return PecMailbox(
            name=name,
            address=self.address,
            smtp_host=self.smtp_host,
            smtp_port=self.smtp_port,
            imap_host=self.imap_host,
            imap_port=self.imap_port,
            username=self.username,
            password=self.password.get_secret_value(),
            per_minute=self.per_minute,
            per_day=self.per_day,
            connections=self.connections,
            max_size=self.max_size,
            receipt_kind=self.receipt_kind,
            credential_expires=self.credential_expires,
            ca_file=Path(self.ca_file) if self.ca_file else None,
        )


def load_mailboxes(names: list[str]) -> dict[str, PecMailbox]:
    """The named blocks as core mailboxes; none named: the settings' mailboxes."""
    if not names:
        return resolve_mailboxes(Settings.load())
    loaded = {}
    for name in names:
        block = PecMailboxBlock.load(name)
        assert isinstance(block, PecMailboxBlock)
        loaded[name] = block.to_mailbox(name)
    return loaded


def _limit_name(kind: str, mailbox: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in mailbox.lower())
    return f"recapito-pec-{kind}-{safe}"


def shared_limits(mailboxes: dict[str, PecMailbox]) -> tuple[MailboxPermits, ConnectionGate]:
    """Per-mailbox rate and connection limits shared by every worker (DESIGN §4)."""
    for box in mailboxes.values():
        per_second = box.per_minute / 60.0
        rate_capacity = max(1, min(10, round(per_second)))
        ensure_global_limit(_limit_name("rate", box.name), rate_capacity, per_second)
        ensure_global_limit(_limit_name("conn", box.name), box.connections, None)
    # the harness and worker settings live in context variables: threads get a copy
    base = contextvars.copy_context()

    def permits(mailbox: str, n: int) -> int:
        base.copy().run(rate_limit, _limit_name("rate", mailbox), occupy=1, strict=True)
        return 1

    def gate(mailbox: str) -> Callable[[], None]:
        entered = threading.Event()
        leave = threading.Event()
        failed: list[BaseException] = []

        def hold() -> None:
            try:
                with concurrency(_limit_name("conn", mailbox), occupy=1, strict=True):
                    entered.set()
                    leave.wait()
            except BaseException as exc:
                failed.append(exc)
                entered.set()

        thread = threading.Thread(
            target=base.copy().run, args=(hold,), daemon=True, name=f"pec-conn-{mailbox}"
        )
        thread.start()
        entered.wait()
        if failed:
            raise failed[0]

        def release() -> None:
            leave.set()
            thread.join(30)

        return release

    return permits, gate


def pec_chunk_cache_key(_ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
    params: core.CampaignParams = parameters["params"]
    return (
        f"recapito:{params.name}:{parameters['campaign_key']}:pec:"
        f"{parameters['chunk']}:{parameters['template_hash']}:{parameters['work_token']}"
    )


@task(
    name="deliver-pec-chunk",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient_only,
    cache_key_fn=pec_chunk_cache_key,
    persist_result=True,
    task_run_name="deliver-pec-chunk-{chunk}",
)
def deliver_pec_chunk(
    params: core.CampaignParams,
    chunk: int,
    campaign_key: str,
    template_hash: str,
    work_token: str,
) -> dict[str, Any]:
    """Submit one chunk's PEC rows through the sender's PEC mailboxes."""
    mailboxes = load_mailboxes(list(params.pec_mailbox_blocks))
    permits, gate = shared_limits(mailboxes)
    return core_deliver_pec_chunk(
        params,
        chunk,
        Settings.load(),
        mailboxes=mailboxes,
        permits=permits,
        connection_gate=gate,
    )


@task(name="check-pec-credentials", retries=1, retry_condition_fn=transient_only)
def check_pec_credentials(block_names: list[str], within_days: int = 14) -> list[dict[str, Any]]:
    """A warning artifact when a mailbox's credentials expire within ``within_days``."""
    mailboxes = load_mailboxes(block_names)
    warnings = expiring_credentials(list(mailboxes.values()), within_days=within_days)
    if warnings:
        create_markdown_artifact(
            expiry_markdown(warnings, within_days),
            key="pec-credentials-expiring",
            description="PEC mailbox credentials about to expire",
        )
    return [
        {
            "mailbox": w.mailbox,
            "address": w.address,
            "expires": w.expires.isoformat(),
            "days_left": w.days_left,
        }
        for w in warnings
    ]


def pec_retry_cache_key(ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Like ``pec_chunk_cache_key``, plus the flow run (see ``tasks.campaign.retry_cache_key``)."""
    return f"{pec_chunk_cache_key(ctx, parameters)}:retry:{ctx.task_run.flow_run_id}"


@task(
    name="retry-pec-chunk",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient_only,
    cache_key_fn=pec_retry_cache_key,
    persist_result=True,
    task_run_name="retry-{params.name}-pec-chunk-{chunk}",
)
def retry_pec_chunk(
    params: core.CampaignParams,
    chunk: int,
    campaign_key: str,
    template_hash: str,
    work_token: str,
) -> dict[str, Any]:
    """Submit the due deferred PEC rows of one chunk again, through the PEC path and the
    mailboxes' shared limits; no other row of the chunk is ever taken."""
    mailboxes = load_mailboxes(list(params.pec_mailbox_blocks))
    permits, gate = shared_limits(mailboxes)
    return core_deliver_pec_chunk(
        params,
        chunk,
        Settings.load(),
        mailboxes=mailboxes,
        permits=permits,
        connection_gate=gate,
        only_deferred=True,
    )
