"""What a request must get past before the server spends anything on it: the API key, the content type, the
body's size and pace; and a deadline for idle connections.

  authorize(svc, request)     401 unless `Authorization: Bearer KEY` matches --api_key (constant-time compare)
  read_body(svc, request)     415 unless Content-Type is application/json; 413 for a body over
                              --max_request_bytes (refused by its Content-Length before any byte is read, or as
                              soon as the bytes read pass the limit); 408 when the body stalls for --idle_timeout
  IdleTimeoutH11Protocol      uvicorn's h11 protocol, closing a connection that has no request in progress and
                              sends no complete request head within --idle_timeout seconds (a new connection, a
                              kept-alive one between requests, a client trickling its headers)
"""

from __future__ import annotations

import asyncio
import hmac

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mor_jax.serve.schemas import ApiError

JSON = "application/json"


def authorize(svc, request) -> None:
  """Raises ApiError(401) when the server has an API key and the request does not carry it."""
  if svc.api_key is None:
    return
  scheme, _, token = request.headers.get("authorization", "").partition(" ")
  if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), svc.api_key.encode()):
    return
  what = "an invalid API key" if scheme else "no API key"
  raise ApiError(401, f"the request has {what}: send the server's key (--api_key / MOR_API_KEY) as "
                 "'Authorization: Bearer KEY'", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_body(svc, request) -> bytes:
  """The request body, within the server's limits (see the module docstring)."""
  media = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if media != JSON:
    raise ApiError(415, f"send the body as JSON with 'Content-Type: {JSON}' (got {media or 'no content type'!r})",
                   param=None, code="unsupported_media_type")
  limit = svc.max_request_bytes
  length = request.headers.get("content-length")
  if length is not None and (not length.strip().isdigit() or int(length) > limit):
    raise _too_large(limit)
  chunks, n, more = [], 0, True
  while more:
    try:
      async with asyncio.timeout(svc.idle_timeout):
        message = await request.receive()
    except TimeoutError:
      raise ApiError(408, f"the request body stalled (no bytes for {svc.idle_timeout:g} s, --idle_timeout)",
                     code="request_body_timeout", headers={"Connection": "close"}) from None
    if message["type"] == "http.disconnect":
      raise ApiError(499, "the client closed the request", code="client_closed")
    body = message.get("body", b"")
    n += len(body)
    if n > limit:
      raise _too_large(limit)
    chunks.append(body)
    more = message.get("more_body", False)
  return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
  return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes (--max_request_bytes)",
                  code="request_too_large")


class IdleTimeoutH11Protocol(H11Protocol):
  """uvicorn's h11 protocol with a deadline for a complete request head: config.timeout_keep_alive seconds from
  the connection's start or from its previous response (uvicorn itself only times out kept-alive connections
  after a response, and restarts that timer on every byte received)."""

  _head_timer: asyncio.TimerHandle | None = None

  def connection_made(self, transport) -> None:
    super().connection_made(transport)
    self._arm()

  def data_received(self, data: bytes) -> None:
    super().data_received(data)
    if self._in_request():
      self._disarm()

  def on_response_complete(self) -> None:
    super().on_response_complete()
    if not self._in_request():
      self._arm()

  def connection_lost(self, exc) -> None:
    self._disarm()
    super().connection_lost(exc)

  def _in_request(self) -> bool:
    return self.cycle is not None and not self.cycle.response_complete

  def _arm(self) -> None:
    if self._head_timer is None and not self.transport.is_closing():
      self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._expire)

  def _disarm(self) -> None:
    if self._head_timer is not None:
      self._head_timer.cancel()
      self._head_timer = None

  def _expire(self) -> None:
    self._head_timer = None
    if not self._in_request() and not self.transport.is_closing():
      try:
        self.timeout_keep_alive_handler()
      except h11.LocalProtocolError:       # a state h11 cannot close politely from: just close
        self.transport.close()
