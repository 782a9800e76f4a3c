"""Secrets kept in Prefect Secret blocks (e.g. an SSH key's passphrase), read by name."""

from __future__ import annotations

from prefect.blocks.system import Secret


def secret_value(block_name: str) -> str:
    """The value of the Prefect Secret block `block_name` (on the current Prefect server)."""
    return str(Secret.load(block_name).get())
