"""The server's public address serves the Fleet API only.

Flower 1.41's SuperLink serves its Fleet (nodes), Control (submit, list and stop runs, register
node keys) and Runtime (the ServerApp's) APIs as routers of one HTTP app on one address, and the
open-source Control API authenticates nobody. So `fedlr server` binds the SuperLink to loopback
(its control address) and puts this front on the public address: an ASGI app, served by
uvicorn with the server's TLS certificate, that forwards the twelve Fleet calls a SuperNode
makes (`POST /v1/fleet/<call>`, matched on the raw path, no query) to the SuperLink over TLS,
and answers anything else with 404 or 405 without reaching it. Node authentication is untouched:
its signed headers travel as they came, and the SuperLink checks them.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("fedlr")

FLEET_CALLS = (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
)
FLEET_PATHS = {f"/v1/fleet/{call}".encode(): f"/v1/fleet/{call}" for call in FLEET_CALLS}
# a node's push-object carries one object of a message (an adapter's tensors in pieces)
MAX_BODY_BYTES = 512 << 20
UPSTREAM_TIMEOUT_SECONDS = 300.0
# never forwarded: they describe one hop's connection, not the request
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"host", b"content-length"})
ANSWER_DROP = HOP_BY_HOP | {b"server", b"date"}  # uvicorn writes its own
Scope = dict[str, Any]


def refusal(scope: Scope) -> tuple[int, str] | None:
    """Why the front does not forward this request (status, reason), None if it does. Nodes
    retry 502-504 and stop on 401, so a refusal is neither."""
    if scope.get("raw_path", scope["path"].encode()) not in FLEET_PATHS or scope["query_string"]:
        return 404, ("not served here: this address serves SuperNodes only (the Fleet API); "
                     "submit and manage runs on the server machine (its control address) or "
                     "through an SSH tunnel to it")
    if scope["method"] != "POST":
        return 405, "the Fleet API takes POST only"
    return None


async def send_text(send: Any, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode()})


async def read_body(receive: Any) -> bytes | None:
    """The request's body, None past MAX_BODY_BYTES."""
    chunks, size = [], 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return None
        chunks.append(event.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            return None
        if not event.get("more_body", False):
            return b"".join(chunks)


class FleetFront:
    """The ASGI app: Fleet calls forwarded to `upstream` (the SuperLink on loopback, verified
    against `ca`; None for plain text), everything else refused here."""

    def __init__(self, upstream: str, ca: Path | None) -> None:
        self.upstream, self.ca = upstream, ca
        self.client: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(self.ca))
                                             if self.ca is not None else False)
            self.client = httpx.AsyncClient(base_url=self.upstream, verify=verify,
                                            timeout=UPSTREAM_TIMEOUT_SECONDS)
        return self.client

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing of Flower's
            return
        if (why := refusal(scope)) is not None:
            await send_text(send, *why)
            return
        body = await read_body(receive)
        if body is None:
            await send_text(send, 413, f"a Fleet request is at most {MAX_BODY_BYTES} bytes")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        path = FLEET_PATHS[scope.get("raw_path", scope["path"].encode())]
        try:  # the answer's bytes as they came (still compressed where they were)
            async with self._client().stream("POST", path, content=body,
                                             headers=headers) as answer:
                raw = b"".join([chunk async for chunk in answer.aiter_raw()])
        except httpx.HTTPError as exc:  # nodes retry a 503
            log.warning("fleet front: the SuperLink did not answer %s (%s)", path, exc)
            await send_text(send, 503, "the coordinator is not reachable; retry")
            return
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [(k, v) for k, v in answer.headers.raw
                                if k.lower() not in ANSWER_DROP]})
        await send({"type": "http.response.body", "body": raw})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
