"""Client ids: fedlr names a client by its partition number, as a string."""

from __future__ import annotations


def client_order(client: str) -> tuple[int, str]:
    """Client ids in numeric order, other names after (a sort key)."""
    return (int(client), "") if client.isdigit() else (0, client)
