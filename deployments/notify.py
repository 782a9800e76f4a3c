"""Notifications: the Prefect automation that tells people when a case run fails, made from config.

`mqi up` keeps one automation, "mqi: case failed", in step with `notify:`: on every
`prefect.flow-run.Failed` event of the case flow it sends one notification per target,
through Prefect's notification blocks (Slack, e-mail, Teams, ... as made on the UI's Blocks
page, which hold their secrets; or a plain webhook, kept in a custom-webhook block). With
no targets configured the automation is removed. The notification reads like the run
list: the case's final message, and a link to its run.
"""

from __future__ import annotations

import hashlib
from uuid import UUID

import httpx
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import SyncPrefectClient
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from config.settings import Settings
from deployments.server import ServiceError

AUTOMATION = "mqi: case failed"
SUBJECT = "MQI: case {{ flow_run.name }} failed"
BODY = "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}"


def webhook_block(url: str) -> UUID:
    """The custom-webhook block that POSTs {"subject", "body"} to `url`, named after the URL's hash."""
    name = "mqi-webhook-" + hashlib.sha256(url.encode()).hexdigest()[:12]
    block = CustomWebhookNotificationBlock(
        name=name, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
    )
    return block.save(name, overwrite=True)  # through this process's client, pointed at the server


def named_block(client: SyncPrefectClient, slug_and_name: str) -> UUID:
    """The id of a notification block made in the UI, e.g. 'slack-webhook/physics'."""
    slug, name = slug_and_name.split("/")
    try:
        return client.read_block_document_by_name(name, block_type_slug=slug).id
    except ObjectNotFound:
        raise ServiceError(
            f"notify.blocks: no block {slug_and_name!r} on the server; create it on the UI's Blocks page"
        ) from None


def failure_automation(settings: Settings, blocks: list[UUID]) -> AutomationCore:
    """On every Failed run of the case flow, one notification per block."""
    return AutomationCore(
        name=AUTOMATION,
        description="Made by `mqi up` from the config's notify: section; it is replaced at every start.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": settings.case_flow_name},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block, subject=SUBJECT, body=BODY) for block in blocks],
    )


def ensure_notifications(client: SyncPrefectClient, settings: Settings) -> list[str]:
    """Replace the automation by one made from `notify:`; return who is told (no URL: it may hold a token)."""
    targets = [
        *settings.notify.blocks,
        *(f"webhook to {httpx.URL(url).host}" for url in settings.notify.webhook_urls),
    ]
    blocks = [named_block(client, name) for name in settings.notify.blocks]
    blocks += [webhook_block(url) for url in settings.notify.webhook_urls]
    for old in client.read_automations_by_name(AUTOMATION):
        client.delete_automation(old.id)
    if blocks:
        client.create_automation(failure_automation(settings, blocks))
    return targets
