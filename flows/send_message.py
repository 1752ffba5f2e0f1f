"""The send-message flow: one transactional message through the campaign path.

Triggered through Prefect's API (``POST /api/deployments/{id}/create_flow_run``),
``run_deployment("send-message/send-message", parameters=...)`` or an event
(``recapito.message.requested``, see deployments/prefect.yaml). The message is a
one-recipient campaign (recapito.sending.transactional): same rules, Secure Email
policy, ledger and artifacts, and a repeated request never sends twice.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.campaign import campaign_flow
from recapito.config import Settings
from recapito.sending import transactional
from tasks.campaign import transient_only


@task(name="message-campaign", retries=2, retry_condition_fn=transient_only)
def message_campaign(
    template: str,
    contact: dict[str, Any],
    sender: str,
    message_key: str | None,
    rules: str | None,
    tls_policy: str,
    pec_mailbox_blocks: list[str],
    tracking: bool,
) -> Any:
    return transactional.message_params(
        Settings.load(),
        template=template,
        contact=contact,
        sender=sender,
        message_key=message_key,
        rules=rules,
        tls_policy=tls_policy,
        pec_mailbox_blocks=pec_mailbox_blocks,
        tracking=tracking,
    )


@task(name="message-outcome", retries=2, retry_condition_fn=transient_only)
def message_outcome(name: str) -> dict[str, Any]:
    return transactional.message_outcome(Settings.load(), name)


@flow(name="send-message", log_prints=False)
def send_message_flow(
    template: str,
    contact: dict[str, Any],
    sender: str,
    message_key: str | None = None,
    rules: str | None = None,
    tls_policy: str = "opportunistic",
    pec_mailbox_blocks: list[str] | None = None,
    tracking: bool = True,
) -> dict[str, Any]:
    """Send ``template`` to one contact (``contact``: its fields, e.g. email, nome, pec)."""
    params = message_campaign(
        template,
        contact,
        sender,
        message_key,
        rules,
        tls_policy,
        list(pec_mailbox_blocks or []),
        tracking,
    )
    campaign_flow(params)
    outcome = message_outcome(params.name)
    get_run_logger().info(
        "message %s: %s %s (%s)",
        params.name,
        outcome.get("channel"),
        outcome.get("state"),
        outcome.get("reason") or outcome.get("tls_level") or "",
    )
    return outcome
