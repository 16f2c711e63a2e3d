"""The admin API's authentication: an API key, or the web UI's session cookie.

A request with ``Authorization`` or ``x-api-key`` is authenticated by its key,
exactly as before (no CSRF token needed: a browser never adds those headers on
its own). Without either, the ``gandalf_session`` cookie stands for the key
that logged in (``auth/session.py``); a write made with it must carry the
session's CSRF token in ``x-csrf-token`` (403 otherwise), checked before the
body is read.
"""

from __future__ import annotations

from gandalf.auth.apikey import KeyCache
from gandalf.auth.session import CSRF_HEADER, Sessions
from gandalf.domain import Identity, Permission
from gandalf.errors import PermissionDenied
from gandalf.server.handlers import KeyAuth
from gandalf.server.wire import Request

_COOKIE = b"cookie"


class SessionAuth(KeyAuth):
    """:class:`KeyAuth` that also accepts a UI session cookie."""

    __slots__ = ("sessions",)

    def __init__(self, keys: KeyCache, needs: Permission, sessions: Sessions) -> None:
        super().__init__(keys, needs)
        self.sessions = sessions

    def cached(self, request: Request) -> Identity | None:
        if request.authorization is not None or request.api_key is not None:
            return super().cached(request)
        session = self.sessions.session(request.header(_COOKIE))
        if session is None:
            return None  # no credential at all: load() answers the usual 401
        self.sessions.check_csrf(session, request.method, request.header(CSRF_HEADER))
        identity = self.sessions.cached(session)
        return None if identity is None else self._permitted(identity)

    async def load(self, request: Request) -> Identity:
        if request.authorization is not None or request.api_key is not None:
            return await super().load(request)
        session = self.sessions.session(request.header(_COOKIE))
        if session is None:
            return await super().load(request)  # the usual "Missing API key" 401
        self.sessions.check_csrf(session, request.method, request.header(CSRF_HEADER))
        return self._permitted(await self.sessions.load(session))

    def _permitted(self, identity: Identity) -> Identity:
        # The login page admits only admin and viewer keys, but a key's role can
        # change under a live session (revoked and re-made, or edited in the file).
        if identity.permissions & self.bits != self.bits:
            raise PermissionDenied(f"Keys with role '{identity.role}' cannot use the admin API.")
        return identity
