"""The JWKS / OIDC discovery fetcher: the network side of JWT sign-in.

auth/jwt.py declares what it needs (``JwksFetcher.get_json``) and never
imports aiohttp; this adapter is wired in by wiring.py. One small session per
worker, opened on the first fetch (inside the running loop), bounded in time
and size: an IdP that hangs or answers megabytes cannot stall or bloat the
worker. Fetches happen in the background refresher and, rarely, on a forced
refresh (an unknown ``kid``): never per request.
"""

from __future__ import annotations

import aiohttp
import orjson

TIMEOUT = 10.0  # seconds for one whole fetch
MAX_BYTES = 1024 * 1024  # a JWKS is a few KB; a discovery document a few more


class JwksError(Exception):
    """A fetch that did not yield a JSON document (status, size, not JSON)."""


class JwksClient:
    """``get_json(url)``: GET ``url``, 200 and JSON, or :class:`JwksError` /
    aiohttp's own errors (the verifier keeps the keys it had either way)."""

    __slots__ = ("_max", "_session", "_timeout")

    def __init__(self, *, timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES) -> None:
        self._timeout = timeout
        self._max = max_bytes
        self._session: aiohttp.ClientSession | None = None

    async def get_json(self, url: str) -> object:
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        async with session.get(url, headers={"accept": "application/json"}) as response:
            if response.status != 200:
                raise JwksError(f"GET {url}: HTTP {response.status}")
            body = await response.content.read(self._max + 1)
        if len(body) > self._max:
            raise JwksError(f"GET {url}: larger than {self._max} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise JwksError(f"GET {url}: not JSON") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
