"""``GET /login``, ``POST /login`` (throttled, audited) and ``POST /logout`` of the ops HTTP server."""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from segnode.node.http_in.base import HttpError, Response
from segnode.node.ops.auth import Guard, OpsRequest, OpsResponse, redirect
from segnode.node.ops.roles import Access
from segnode.node.ops.sessions import LoginThrottle

logger = logging.getLogger(__name__)

_CSS = ("body{font:15px/1.4 system-ui,sans-serif;margin:3em auto;max-width:22em;color:#222}"
        "label{display:block;margin:.6em 0}input{width:100%;padding:.3em}.error{color:#a11}")


class Login:
    """The login and logout handlers; ``routes()`` gives them with their access."""

    def __init__(self, guard: Guard, throttle: LoginThrottle, *, node: str,
                 audit: Callable[..., Any] | None = None) -> None:
        self.guard, self.throttle, self.node, self.audit = guard, throttle, node, audit

    def routes(self) -> list[tuple[str, str, Callable[[OpsRequest], Response], Access]]:
        return [("GET", "/login", self.page, None), ("POST", "/login", self.login, None),
                ("POST", "/logout", self.logout, True)]

    def page(self, req: OpsRequest) -> Response:
        return self._form(HTTPStatus.OK, next_path(req.arg("next")), "")

    def login(self, req: OpsRequest) -> Response:
        if self.guard.accounts is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "this node has no accounts")
        form = req.form()
        name, password, target = form.get("name", "")[:64], form.get("password", ""), next_path(form.get("next"))
        keys = (f"user:{name}", f"addr:{req.client}")
        wait = self.throttle.wait_s(*keys)
        if wait > 0:
            self._audit("login.throttled", name, req, wait_s=round(wait, 1))
            page = self._form(HTTPStatus.TOO_MANY_REQUESTS, target, "too many failed logins: try again later")
            page.headers.append(("Retry-After", str(math.ceil(wait))))
            return page
        user = self.guard.accounts.check_password(name, password)
        if user is None:
            self.throttle.failed(*keys)
            self._audit("login.failed", name, req)
            return self._form(HTTPStatus.UNAUTHORIZED, target, "wrong name or password")
        self.throttle.succeeded(*keys)
        session = self.guard.sessions.create(user)
        self._audit("login", name, req)
        return redirect(target, ("Set-Cookie", self.guard.session_cookie(req, session)))

    def logout(self, req: OpsRequest) -> Response:
        if req.session is not None:
            self.guard.sessions.end(req.session.sid)
            self._audit("logout", req.session.user.name, req)
        return redirect("/login", ("Set-Cookie", self.guard.session_cookie(req, None)))

    def _audit(self, event: str, name: str, req: OpsRequest, **fields: Any) -> None:
        logger.info("%s from %s", event, req.client)
        if self.audit is not None:
            self.audit(event, user=name, via="session", client=req.client, **fields)

    def _form(self, status: HTTPStatus, target: str, error: str) -> OpsResponse:
        e = html.escape
        message = f"<p class=error id=error>{e(error)}</p>" if error else ""
        page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
                f"<title>segnode {e(self.node)}: log in</title><style>{_CSS}</style></head><body>"
                f"<h1>segnode <small>{e(self.node)}</small></h1>{message}"
                '<form id=login method=post action="/login">'
                f'<input type=hidden name=next value="{e(target)}">'
                '<label>name <input name=name id=name autocomplete=username required maxlength=64></label>'
                '<label>password <input name=password id=password type=password autocomplete=current-password '
                "required></label><button id=submit>Log in</button></form></body></html>\n")
        return OpsResponse(status, page.encode("utf-8"), "text/html; charset=utf-8")


def next_path(raw: str | None) -> str:
    """Where to go after login: a path on this node only (never ``//elsewhere`` or a full URL)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/status"
    return raw
