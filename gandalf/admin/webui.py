"""The admin web UI at ``/ui/``: static pages, login and logout (a Starlette app).

The pages are plain HTML, one small vanilla-JS file and one CSS file shipped in
``gandalf/admin/static`` (read once when the worker starts; no build step, no
CDN). Everything the pages show comes from the admin API (``/admin/v1``),
called by the page's script with the session cookie this app sets at login;
see ``auth/session.py`` for the cookie, its signature and the CSRF token.

Routes (all under ``/ui``):

- ``GET /ui/``: the app shell; without a valid session, a redirect to the login page.
- ``GET /ui/login``, ``POST /ui/login`` (form field ``key``): a key that may
  read the admin API (admin or viewer) gets a session cookie (HttpOnly,
  SameSite=Strict, Secure behind an https proxy) and a redirect to ``/ui/``.
  The key is read from the form body only: never from the URL, never stored.
- ``POST /ui/logout`` (with ``x-csrf-token``): ends the session, clears the cookie.
- ``GET /ui/session``: who is logged in, whether they may write, the CSRF token.
- ``GET /ui/static/{name}``: the script, the stylesheet.
"""

from __future__ import annotations

import hashlib
import html
import importlib.resources
from typing import Any
from urllib.parse import parse_qs

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gandalf.auth.apikey import KeyCache
from gandalf.auth.session import COOKIE, CSRF_HEADER, Session, Sessions
from gandalf.domain import Identity, Permission
from gandalf.errors import GatewayError

PREFIX = "/ui"
# The request headers the UI app reads (server/mount.py copies only these).
FORWARDED: tuple[bytes, ...] = (
    b"content-type",
    b"accept",
    b"cookie",
    b"host",
    b"origin",
    b"x-forwarded-proto",
    b"x-csrf-token",
    b"if-none-match",
)
_MAX_FORM = 4096  # a login form holds one key
_ENCODER = msgspec.json.Encoder()
# Every page: no framing, no inline script, nothing from elsewhere.
_SECURITY = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # "no-referrer" makes Chromium send Origin: null
}
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}


class _Asset:
    __slots__ = ("body", "etag", "media_type")

    def __init__(self, body: bytes, media_type: str) -> None:
        self.body = body
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def _assets() -> dict[str, _Asset]:
    """Every file of ``gandalf/admin/static``, read once."""
    folder = importlib.resources.files("gandalf.admin").joinpath("static")
    out = {}
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and suffix in _TYPES:
            out[name] = _Asset(entry.read_bytes(), _TYPES[suffix])
    return out


def _page(body: bytes | str, status: int = 200, media_type: str = _TYPES[".html"]) -> Response:
    headers = dict(_SECURITY)
    headers["cache-control"] = "no-store"
    return Response(body, status, headers, media_type=media_type)


def _https(request: Request) -> bool:
    """Whether the browser reached us over https (Gandalf itself speaks plain
    HTTP: TLS ends at a proxy that says so in ``x-forwarded-proto``)."""
    proto = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or proto.split(",")[0].strip().lower() == "https"


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site's page
    (a cross-site form): ``Origin`` present and not this host."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def create_ui_app(keys: KeyCache, sessions: Sessions) -> Starlette:
    """The web UI for one worker: ``keys`` checks a login's key, ``sessions``
    issues and reads session cookies (shared secret: any worker reads any)."""
    assets = _assets()
    login_html = assets["login.html"].body.decode("utf-8")
    index = assets["index.html"].body
    codec = sessions.codec

    def login_page(message: str = "", status: int = 200) -> Response:
        shown = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        return _page(login_html.replace("<!--error-->", shown), status)

    async def identity_of(request: Request) -> tuple[Session, Identity] | None:
        try:
            session = sessions.session(request.headers.get("cookie", "").encode("latin-1"))
            if session is None:
                return None
            identity = sessions.cached(session) or await sessions.load(session)
        except GatewayError:
            return None
        if not identity.can(Permission.READ_ADMIN):
            return None
        return session, identity

    async def root(request: Request) -> Response:
        return RedirectResponse(PREFIX + "/", 308)

    async def shell(request: Request) -> Response:
        if await identity_of(request) is None:
            return RedirectResponse(PREFIX + "/login", 303, headers={"cache-control": "no-store"})
        return _page(index)

    async def login_form(request: Request) -> Response:
        return login_page()

    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return login_page("Log in from this gateway's own page.", 403)
        body = await request.body()
        fields = parse_qs(body[:_MAX_FORM].decode("utf-8", "replace"), max_num_fields=4)
        key = (fields.get("key") or [""])[0].strip()
        if not key:
            return login_page("Enter an admin or viewer API key.", 400)
        try:
            identity = keys.cached(key) or await keys.load(key)
        except GatewayError as exc:
            if exc.status >= 500:
                return login_page("The gateway cannot check keys right now; retry shortly.", 503)
            return login_page("That key is not valid.", 401)
        if not identity.can(Permission.READ_ADMIN):
            return login_page(
                f"Keys with role '{identity.role}' cannot use the admin UI "
                "(it needs an admin or viewer key).",
                403,
            )
        sessions.remember(identity)
        value, _ = codec.issue(identity.key_id)
        response = RedirectResponse(PREFIX + "/", 303, headers={"cache-control": "no-store"})
        response.set_cookie(
            COOKIE,
            value,
            max_age=int(codec.ttl),
            path="/",
            secure=_https(request),
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(request: Request) -> Response:
        found = await identity_of(request)
        response = Response(status_code=204, headers={"cache-control": "no-store"})
        if found is not None:
            session = found[0]
            token = request.headers.get(CSRF_HEADER.decode(), "").encode("latin-1")
            if not codec.csrf_ok(session, token) or not _same_origin(request):
                return Response(
                    b'{"error":{"message":"Missing or wrong CSRF token.","type":'
                    b'"permission_error","param":null,"code":"csrf"}}',
                    403,
                    media_type="application/json",
                )
            codec.end(session)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def session_info(request: Request) -> Response:
        found = await identity_of(request)
        if found is None:
            return Response(
                b'{"error":{"message":"Not logged in.","type":"authentication_error",'
                b'"param":null,"code":"invalid_api_key"}}',
                401,
                {"cache-control": "no-store"},
                media_type="application/json",
            )
        session, identity = found
        info: dict[str, Any] = {
            "key_id": identity.key_id,
            "name": identity.name,
            "role": identity.role,
            "can_write": identity.can(Permission.MANAGE_KEYS),
            "csrf": codec.csrf(session),
            "expires": session.expires,
        }
        headers = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
        return Response(_ENCODER.encode(info), 200, headers, media_type="application/json")

    async def static(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None or asset.media_type == _TYPES[".html"]:
            return Response(b"Not found", 404, media_type="text/plain")
        headers = dict(_SECURITY)
        headers["etag"] = asset.etag
        headers["cache-control"] = "no-cache"  # revalidate: a new release changes the etag
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, 200, headers, media_type=asset.media_type)

    return Starlette(
        routes=[
            Route(PREFIX, root, methods=["GET"]),
            Route(PREFIX + "/", shell, methods=["GET"]),
            Route(PREFIX + "/login", login_form, methods=["GET"]),
            Route(PREFIX + "/login", login, methods=["POST"]),
            Route(PREFIX + "/logout", logout, methods=["POST"]),
            Route(PREFIX + "/session", session_info, methods=["GET"]),
            Route(PREFIX + "/static/{name}", static, methods=["GET"]),
        ]
    )
