"""Browser sessions for the admin web UI: a signed cookie, a CSRF token bound to it.

A session is made by logging in with an admin or viewer key (``/ui/login``).
The key itself never leaves that request: the cookie holds a random session
id, the key's *id* and an expiry, signed with HMAC-SHA256 under a secret every
worker of one ``gandalf serve`` shares (``gandalf serve`` puts a fresh one in
``$GANDALF_UI_SECRET`` before it starts the workers; without it, e.g. an app
built in a test, the process makes its own). So any worker accepts a session
another one made, with no session table; a restart of the server ends every
session (a new secret).

Each request with the cookie is the key's request: the key is looked up by its
hash in the worker's key cache, so revoking, blocking or expiring the key ends
its sessions as soon as the cache learns of it (at once: the change feed).

The CSRF token is ``HMAC(secret, "csrf" + session id)``: the page reads it
from ``/ui/session`` (same origin only) and sends it back in ``x-csrf-token``
on every write; a cross-site form or script cannot read it. Writes with a
Bearer key need none (a browser never adds that header by itself).

Logout clears the cookie in the browser and remembers the session id in this
worker until it would have expired anyway; another worker still accepts a
copy of that cookie until its expiry (the price of a stateless session: no
store round trip per request). Keep ``SESSION_TTL`` short for that reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping

from gandalf.auth.apikey import KeyCache
from gandalf.domain import Identity
from gandalf.errors import AuthenticationError, PermissionDenied

ENV_SECRET = "GANDALF_UI_SECRET"
COOKIE = "gandalf_session"
CSRF_HEADER = b"x-csrf-token"
SESSION_TTL = 8 * 3600.0  # seconds: a working day
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_COOKIE = 1024  # a real one is ~120 bytes; anything longer is not ours
_MAX_ENDED = 100_000  # logged-out ids remembered per worker (each until its expiry)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parsed(text: str) -> bytes | None:
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        return None
    return secret if len(secret) >= 32 else None


def secret_from_env(environ: Mapping[str, str] = os.environ) -> bytes:
    """The signing secret ``gandalf serve`` shares with its workers
    (``$GANDALF_UI_SECRET``, 64+ hex digits), else a fresh random one for this process."""
    return _parsed(environ.get(ENV_SECRET, "")) or os.urandom(32)


def share_secret(environ: MutableMapping[str, str]) -> None:
    """Put a fresh secret in ``$GANDALF_UI_SECRET`` for the workers to share,
    unless the operator set a valid one (kept: sessions then outlive a restart)."""
    if _parsed(environ.get(ENV_SECRET, "")) is None:
        environ[ENV_SECRET] = secrets.token_hex(32)


class Session:
    """A verified session: its id, the key it acts for, when it ends (epoch s)."""

    __slots__ = ("expires", "key_id", "sid")

    def __init__(self, sid: str, key_id: str, expires: int) -> None:
        self.sid = sid
        self.key_id = key_id
        self.expires = expires


class SessionCodec:
    """Issues and verifies session cookies and their CSRF tokens."""

    __slots__ = ("_clock", "_ended", "_secret", "ttl")

    def __init__(
        self,
        secret: bytes,
        *,
        ttl: float = SESSION_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self.ttl = ttl
        self._clock = clock
        self._ended: dict[str, int] = {}  # sid -> expiry, logged out in this worker

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, key_id: str) -> tuple[str, Session]:
        """A new session for key ``key_id``: the cookie's value and the session."""
        sid = _b64(secrets.token_bytes(16))
        expires = int(self._clock() + self.ttl)
        payload = f"{sid}.{_b64(key_id.encode('utf-8'))}.{expires}"
        return f"{payload}.{self._mac(payload)}", Session(sid, key_id, expires)

    def verify(self, value: str) -> Session | None:
        """The session ``value`` stands for, or None: not ours, tampered with,
        expired, or logged out in this worker."""
        if len(value) > _MAX_COOKIE:
            return None
        parts = value.split(".")
        if len(parts) != 4:
            return None
        sid, kid, exp, mac = parts
        if not hmac.compare_digest(mac, self._mac(f"{sid}.{kid}.{exp}")):
            return None
        try:
            expires = int(exp)
            key_id = _unb64(kid).decode("utf-8")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if expires <= self._clock() or sid in self._ended:
            return None
        return Session(sid, key_id, expires)

    def csrf(self, session: Session) -> str:
        """The session's CSRF token (what ``x-csrf-token`` must carry)."""
        return self._mac("csrf." + session.sid)

    def csrf_ok(self, session: Session, token: bytes | None) -> bool:
        if not token:
            return False
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            return False
        return hmac.compare_digest(text, self.csrf(session))

    def end(self, session: Session) -> None:
        """Log ``session`` out in this worker (until it would have expired)."""
        ended = self._ended
        if len(ended) >= _MAX_ENDED:
            now = self._clock()
            for sid in [s for s, e in ended.items() if e <= now]:
                del ended[sid]
            if len(ended) >= _MAX_ENDED:  # all still live: forget the oldest
                del ended[next(iter(ended))]
        ended[session.sid] = session.expires


def cookie_value(header: bytes | None, name: str = COOKIE) -> str | None:
    """Cookie ``name``'s value in a ``Cookie`` request header, or None."""
    if not header:
        return None
    try:
        text = header.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


KeyHashById = Callable[[str], Awaitable["str | None"]]

_EXPIRED = "Your session has expired or is not valid: log in again at /ui/login."
_CSRF = (
    "Missing or wrong CSRF token: a write made with a session cookie needs the "
    "x-csrf-token header the UI got from /ui/session."
)


class Sessions:
    """A session cookie -> the key's :class:`Identity` (through the key cache).

    ``key_hash_of`` looks a key's hash up by its id (the store); a key's hash
    never changes, so each id is looked up once per worker."""

    __slots__ = ("_hashes", "codec", "key_hash_of", "keys")

    def __init__(self, codec: SessionCodec, keys: KeyCache, key_hash_of: KeyHashById) -> None:
        self.codec = codec
        self.keys = keys
        self.key_hash_of = key_hash_of
        self._hashes: dict[str, str] = {}

    def session(self, cookie_header: bytes | None) -> Session | None:
        """The verified session in a ``Cookie`` header; None when there is no
        session cookie at all. Raises AuthenticationError for a bad one."""
        value = cookie_value(cookie_header)
        if value is None:
            return None
        session = self.codec.verify(value)
        if session is None:
            raise AuthenticationError(_EXPIRED)
        return session

    def check_csrf(self, session: Session, method: str, token: bytes | None) -> None:
        """PermissionDenied (403) for a write without the session's CSRF token."""
        if method not in SAFE_METHODS and not self.codec.csrf_ok(session, token):
            raise PermissionDenied(_CSRF)

    def cached(self, session: Session) -> Identity | None:
        """The session's identity if the key cache knows the key, else None."""
        key_hash = self._hashes.get(session.key_id)
        if key_hash is None:
            return None
        return self.keys.cached_hash(key_hash)

    async def load(self, session: Session) -> Identity:
        """The session's identity from the store; AuthenticationError when the
        key is gone, revoked, blocked or expired."""
        key_hash = self._hashes.get(session.key_id)
        if key_hash is None:
            key_hash = await self.key_hash_of(session.key_id)
            if key_hash is None:
                raise AuthenticationError(_EXPIRED)
            if len(self._hashes) >= _MAX_ENDED:
                self._hashes.clear()
            self._hashes[session.key_id] = key_hash
        return await self.keys.load_hash(key_hash)

    def remember(self, identity: Identity) -> None:
        """Learn ``identity``'s key hash at login (saves a lookup later)."""
        if len(self._hashes) >= _MAX_ENDED:
            self._hashes.clear()
        self._hashes[identity.key_id] = identity.key_hash
