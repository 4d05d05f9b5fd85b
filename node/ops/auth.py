"""Who is asking, and may they: authentication, roles, CSRF and Origin checks, security headers.

Run by the ops HTTP server before every handler (:mod:`segnode.node.ops.api`):

1. :meth:`Guard.authenticate`: a session cookie (``segnode_session``), a personal
   API token or the shared token (``Authorization: Bearer``) names the acting
   :class:`~segnode.node.ops.roles.Principal` (``req.user``).  A wrong bearer
   token is 401.  HTTP Basic is not accepted: browsers replay it on their own,
   so a cross-site form would carry it.
2. :meth:`Guard.check_request`: a state-changing request (POST, PUT, DELETE)
   whose ``Origin`` (else ``Referer``) is another origin is 403; one made with a
   session cookie must also name the node's own origin and carry the session's
   CSRF token (form field ``csrf`` or header ``X-CSRF-Token``).  Bearer-token
   requests without a cookie are not sent by browsers on their own and need no
   CSRF token.
3. :meth:`Guard.authorize`: the route's ``access`` against the user's roles
   (401 without a user, 403 with the wrong role; a browser asking for a page is
   sent to ``/login`` instead of the 401).

When the node has neither a token file nor any account (a loopback-only
node, as before accounts existed) requests need no login, but the Origin check
still holds and decisions on held jobs need a named user.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, quote, urlsplit

from segnode.node.http_in.base import HttpError, Request, Response
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.roles import TOKEN_PRINCIPAL, Access, Principal
from segnode.node.ops.sessions import Session, SessionStore

COOKIE = "segnode_session"
CSRF_HEADER = "x-csrf-token"
STATE_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})

#: the policy of our own pages: nothing from elsewhere, never framed
DEFAULT_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = (("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "same-origin"))


@dataclass
class OpsRequest(Request):
    """A request to the ops server: the base request plus its headers, the acting user and session."""

    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    secure: bool = False  # came over TLS
    user: Principal | None = None
    session: Session | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def form(self) -> dict[str, str]:
        """The url-encoded body as ``name → last value``."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8", "replace")).items()}

    @property
    def own_origin(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.header('host') or ''}"

    @property
    def wants_html(self) -> bool:
        return self.method == "GET" and "text/html" in (self.header("accept") or "")


@dataclass
class OpsResponse(Response):
    """A response with extra headers (cookies, redirects) and, for a route that needs it, its own CSP."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    csp: str | None = None


def redirect(location: str, *headers: tuple[str, str]) -> OpsResponse:
    return OpsResponse(HTTPStatus.SEE_OTHER, b"", "text/plain", [("Location", location), *headers])


class Guard:
    """The checks every request passes; knows the shared token, the accounts and the sessions."""

    def __init__(self, *, token: bytes | None, accounts: AccountStore | None, sessions: SessionStore,
                 secure_cookie: bool = False) -> None:
        self.token, self.accounts, self.sessions = token, accounts, sessions
        self.secure_cookie = secure_cookie

    @property
    def login_required(self) -> bool:
        return self.token is not None or (self.accounts is not None and self.accounts.any())

    # -- 1. who -------------------------------------------------------------------------------
    def authenticate(self, req: OpsRequest) -> None:
        header = req.header("authorization")
        if header:
            req.user = self._bearer_user(header)
            return
        session = self.sessions.get(session_id(req))
        if session is not None and self.accounts is not None and not self.accounts.exists(session.user.name):
            self.sessions.end(session.sid)  # removed with `segnode users remove` while logged in
            session = None
        req.session = session
        req.user = None if session is None else session.user

    def _bearer_user(self, header: str) -> Principal:
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            if self.token is not None and hmac.compare_digest(value.encode("utf-8", "replace"), self.token):
                return TOKEN_PRINCIPAL
            user = self.accounts.principal_for_token(value) if self.accounts is not None else None
            if user is not None:
                return user
        raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong token")

    # -- 2. from where ----------------------------------------------------------------------------
    def check_request(self, req: OpsRequest) -> None:
        if req.method not in STATE_CHANGING:
            return
        origin = request_origin(req)
        if origin is not None and origin != req.own_origin:
            raise HttpError(HTTPStatus.FORBIDDEN, f"cross-origin request refused (from {origin})")
        if session_id(req) is None:
            return
        if origin is None:
            raise HttpError(HTTPStatus.FORBIDDEN, "a request with a session cookie must carry Origin or Referer")
        if req.session is not None and not req.session.csrf_matches(csrf_of(req)):
            raise HttpError(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token")

    # -- 3. may they -------------------------------------------------------------------------------
    def authorize(self, req: OpsRequest, access: Access) -> OpsResponse | None:
        """``None`` when the request may go on; a redirect to the login page for a browser."""
        if access is None or (req.user is None and not self.login_required):
            return None
        if req.user is None:
            if req.wants_html:
                return redirect("/login?next=" + quote(req.path, safe="/"))
            raise HttpError(HTTPStatus.UNAUTHORIZED, "log in, or send a bearer token")
        if not req.user.may(access):
            raise HttpError(HTTPStatus.FORBIDDEN, f"{req.user.name} may not do this (needs {describe(access)})")
        return None

    def session_cookie(self, req: OpsRequest, session: Session | None) -> str:
        flags = "; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if req.secure or self.secure_cookie else "")
        if session is None:
            return f"{COOKIE}=; Max-Age=0{flags}"
        return f"{COOKIE}={session.sid}{flags}"


def describe(access: Access) -> str:
    if access is None or access is True:
        return "a login"
    roles = sorted(access) if isinstance(access, frozenset) else [access]
    return "role " + " or ".join(r.value for r in roles)


def session_id(req: OpsRequest) -> str | None:
    raw = req.header("cookie")
    if not raw:
        return None
    try:
        morsel = SimpleCookie(raw).get(COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None and morsel.value else None


def request_origin(req: OpsRequest) -> str | None:
    """``scheme://host[:port]`` of the page that made the request (Origin, else Referer); None if neither."""
    origin = req.header("origin")
    if origin:
        return origin.strip()  # "null" (a sandboxed or file: page) never equals our origin
    referer = req.header("referer")
    if not referer:
        return None
    parts = urlsplit(referer.strip())
    return f"{parts.scheme}://{parts.netloc}"


def csrf_of(req: OpsRequest) -> str | None:
    header = req.header(CSRF_HEADER)
    if header:
        return header
    if "application/x-www-form-urlencoded" in (req.header("content-type") or ""):
        return req.form().get("csrf")
    return None
