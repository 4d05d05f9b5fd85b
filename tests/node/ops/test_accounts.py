"""Accounts, sessions, roles, CSRF and Origin checks of the ops HTTP server, over a real socket.

Every refusal is checked with its status and with nothing done: the review
callable records each decision that reached the node.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import stat
import types
from urllib.parse import urlencode, urlsplit

import pytest
from segnode.node.cli.main import main
from segnode.node.config import NodeConfig
from segnode.node.config.http import HttpConfig
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.api import start_http
from segnode.node.ops.audit import read_records
from segnode.node.ops.roles import TOKEN_PRINCIPAL, Principal, Role
from segnode.node.ops.runner import Ops, audit_path
from segnode.node.ops.sessions import LoginThrottle, SessionStore
from segnode.routing import RulesHolder

from tests.ops_helpers import FakeClock, scripted_index

PASSWORD = {"alice": "alice-password-1", "carol": "carol-password-1", "olga": "olga-password-1"}
TOKEN = "shared-machine-token-0123456789"


# -- the accounts file ---------------------------------------------------------------------------


def test_passwords_are_scrypt_hashes_with_a_salt_each_tokens_only_digests(tmp_path):
    store = AccountStore(tmp_path / "accounts.db")
    store.add("alice", frozenset({Role.REVIEWER}), "same-password-1")
    store.add("bob", frozenset({Role.OPS}), "same-password-1")
    token = store.new_token("bob")
    assert stat.S_IMODE((tmp_path / "accounts.db").stat().st_mode) == 0o600
    raw = (tmp_path / "accounts.db").read_bytes()
    assert b"same-password-1" not in raw and token.encode() not in raw
    import sqlite3

    with sqlite3.connect(tmp_path / "accounts.db") as db:
        rows = db.execute("SELECT salt, hash FROM users ORDER BY name").fetchall()
    assert rows[0][0] != rows[1][0] and rows[0][1] != rows[1][1]  # same password, different salt and hash
    assert store.check_password("alice", "same-password-1") == Principal("alice", frozenset({Role.REVIEWER}),
                                                                         "session")
    assert store.check_password("alice", "same-password-2") is None
    assert store.check_password("nobody", "same-password-1") is None
    assert store.check_password("bob", "") is None
    assert store.principal_for_token(token) == Principal("bob", frozenset({Role.OPS}), "token")
    assert store.principal_for_token(token + "x") is None
    store.remove("bob")
    assert store.principal_for_token(token) is None and [a.name for a in store.users()] == ["alice"]


def test_users_cli_add_list_token_remove(tmp_path, monkeypatch, capsys):
    state = str(tmp_path / "state")
    (tmp_path / "pw").write_text("a-long-password\n")
    assert main(["users", "add", "alice", "--role", "reviewer", "--password-file", str(tmp_path / "pw"),
                 "--state-dir", state]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("another-password\n"))
    assert main(["users", "add", "olga", "--role", "ops", "--role", "curator", "--password-stdin",
                 "--state-dir", state]) == 0
    assert main(["users", "add", "alice", "--role", "admin", "--state-dir", state]) == 3  # exists
    assert main(["users", "add", "eve", "--role", "boss", "--state-dir", state]) == 2
    assert main(["users", "add", "eve", "--role", "ops", "--password-file", str(tmp_path / "pw"),
                 "--state-dir", state]) == 0
    capsys.readouterr()
    assert main(["users", "token", "olga", "--state-dir", state]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["users", "remove", "eve", "--state-dir", state]) == 0
    capsys.readouterr()
    assert main(["users", "list", "--state-dir", state]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"alice\s+reviewer\s+password=yes tokens=0", listing)
    assert re.search(r"olga\s+curator,ops\s+password=yes tokens=1", listing) and "eve" not in listing
    store = AccountStore.in_state_dir(tmp_path / "state")
    assert store.check_password("olga", "another-password") is not None
    assert store.principal_for_token(token).name == "olga"


def test_the_throttle_doubles_the_wait_and_a_success_clears_it():
    clock = FakeClock()
    throttle = LoginThrottle(free=3, delay_s=2.0, max_delay_s=10.0, clock=clock)
    for _ in range(3):
        assert throttle.wait_s("user:a", "addr:x") == 0
        throttle.failed("user:a", "addr:x")
    assert throttle.wait_s("user:a") == 2.0 and throttle.wait_s("addr:x", "user:other") == 2.0
    clock.advance(2.0)
    assert throttle.wait_s("user:a") == 0
    throttle.failed("user:a")
    assert throttle.wait_s("user:a") == 4.0
    for _ in range(5):
        throttle.failed("user:a")
    assert throttle.wait_s("user:a") == 10.0  # capped
    throttle.succeeded("user:a")
    assert throttle.wait_s("user:a") == 0


def test_sessions_end_when_idle_or_too_old():
    clock = FakeClock()
    store = SessionStore(idle_s=10, max_s=25, clock=clock)
    user = Principal("alice", frozenset({Role.REVIEWER}), "session")
    session = store.create(user)
    for _ in range(2):
        clock.advance(9)
        assert store.get(session.sid) is session
    clock.advance(11)
    assert store.get(session.sid) is None
    other = store.create(user)
    for _ in range(3):
        clock.advance(9)
    assert store.get(other.sid) is None  # 27 s after login
    assert not session.csrf_matches(None) and not session.csrf_matches(session.sid)


def test_roles():
    reviewer = Principal("r", frozenset({Role.REVIEWER}), "session")
    assert reviewer.may(Role.REVIEWER) and reviewer.may(True) and reviewer.may(None)
    assert not reviewer.may(Role.OPS) and not reviewer.may(frozenset({Role.OPS, Role.CURATOR}))
    assert TOKEN_PRINCIPAL.may(Role.CURATOR)  # admin may do everything


# -- over a socket -----------------------------------------------------------------------------


class Client:
    """A browser-like client: keeps the session cookie, sends Origin as a browser would, never follows redirects."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.origin = parts.hostname, parts.port, url
        self.cookie: str | None = None
        self.csrf: str | None = None

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        sent = dict(headers or {})
        if isinstance(body, dict):
            body = urlencode(body).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if self.cookie:
            sent.setdefault("Cookie", self.cookie)
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.headers, data

    def login(self, name: str, password: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        status, headers, body = self.request("POST", "/login", {"name": name, "password": password,
                                                                "next": "/jobs/1/review"},
                                             {"Origin": self.origin})
        if status == 303:
            self.cookie = headers["Set-Cookie"].split(";", 1)[0]
            page = self.request("GET", "/status", headers={"Accept": "text/html"})[2].decode()
            self.csrf = re.search(r'name=csrf value="([^"]+)"', page).group(1)
        return status, headers, body

    def decide(self, job_id: int, fields: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, dict]:
        status, _, body = self.request("POST", f"/jobs/{job_id}/decision", fields, headers)
        return status, (json.loads(body) if body.startswith(b"{") else {})


@pytest.fixture
def served(tmp_path):
    """The ops server of a node with three people and the shared token; decisions are recorded, never applied."""
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "token").chmod(0o600)
    cfg = NodeConfig(port=0, state_dir=tmp_path / "state", limits={"min_free_disk_mb": 1},
                     http={"port": 0, "token_file": str(tmp_path / "token"), "login_free_failures": 3,
                           "login_delay_s": 600})
    accounts = AccountStore.in_state_dir(cfg.state_dir)
    accounts.add("alice", frozenset({Role.REVIEWER}), PASSWORD["alice"])
    accounts.add("carol", frozenset({Role.CURATOR}), PASSWORD["carol"])
    accounts.add("olga", frozenset({Role.OPS}), PASSWORD["olga"])
    s = scripted_index(cfg.index_path)
    decisions: list[tuple[int, bool, str, str]] = []

    def review(job_id: int, approve: bool, reviewer: str, comment: str = "") -> str:
        decisions.append((job_id, approve, reviewer, comment))
        return "sending"

    service = types.SimpleNamespace(config=cfg, index=s.index, rules=RulesHolder(None), scp=None, listeners=[],
                                    remote=None, dicomweb=None, review=review)
    ops = Ops(service)
    ops.start()
    yield types.SimpleNamespace(url=ops.http.url, jobs=s.jobs, decisions=decisions, ops=ops, accounts=accounts,
                                audit=lambda: read_records(audit_path(cfg)))
    ops.stop()


HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


@pytest.mark.parametrize(("method", "path"), [("GET", "/login"), ("GET", "/healthz"), ("GET", "/status"),
                                              ("GET", "/api/v1/jobs"), ("GET", "/nowhere"), ("POST", "/login")])
def test_every_response_forbids_framing_and_sniffing(served, method, path):
    status, headers, _ = Client(served.url).request(method, path, b"" if method == "POST" else None)
    assert all(headers[k] == v for k, v in HEADERS.items()), (status, dict(headers))
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp


def test_a_route_may_ask_for_its_own_csp(served):
    app = served.ops.app()
    app.csp_by_prefix["/viewer/"] = "default-src 'self' 'wasm-unsafe-eval'; frame-ancestors 'none'"
    assert app.csp_for("/viewer/index.html").startswith("default-src 'self' 'wasm-unsafe-eval'")
    assert "script-src 'self'" in app.csp_for("/status")


def test_login_sets_a_strict_http_only_cookie_and_pages_redirect_to_login(served):
    browser = Client(served.url)
    status, headers, _ = browser.request("GET", "/jobs/1/review", headers={"Accept": "text/html"})
    assert (status, headers["Location"]) == (303, "/login?next=/jobs/1/review")
    assert browser.request("GET", "/api/v1/jobs")[0] == 401
    status, headers, body = browser.login("alice", "wrong-password")
    assert status == 401 and b"wrong name or password" in body and "Set-Cookie" not in headers
    status, headers, _ = browser.request("POST", "/login", {"name": "alice", "password": PASSWORD["alice"]},
                                         {"Origin": "http://evil.example"})  # login CSRF
    assert status == 403 and "Set-Cookie" not in headers
    status, headers, _ = browser.login("alice", PASSWORD["alice"])
    assert (status, headers["Location"]) == (303, "/jobs/1/review")
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("segnode_session=") and "; HttpOnly" in cookie and "; SameSite=Strict" in cookie
    assert "; Path=/" in cookie and "Secure" not in cookie  # plain HTTP on loopback
    assert browser.request("GET", "/api/v1/jobs")[0] == 200
    status, _, body = browser.request("GET", "/status")
    assert status == 200 and b"alice" in body and b'action="/logout"' in body
    assert browser.request("POST", "/logout", {"csrf": browser.csrf}, {"Origin": served.url})[0] == 303
    assert browser.request("GET", "/api/v1/jobs")[0] == 401  # the session ended on the server
    records = [r for r in served.audit() if r["event"].startswith("log")]
    assert [(r["event"], r["user"], r["via"]) for r in records] == [
        ("login.failed", "alice", "session"), ("login", "alice", "session"), ("logout", "alice", "session")]
    assert all("password" not in json.dumps(r) for r in records)


def test_the_reviewer_is_the_logged_in_user_and_the_audit_says_so(served):
    browser = Client(served.url)
    browser.login("alice", PASSWORD["alice"])
    job = served.jobs["done"]
    status, _ = browser.decide(job, {"csrf": browser.csrf, "decision": "approve", "comment": "fine"},
                               {"Origin": served.url})
    assert status == 200 and served.decisions == [(job, True, "alice", "fine")]
    [record] = [r for r in served.audit() if r["event"] == "review.decision"]
    assert (record["reviewer"], record["via"], record["decision"]) == ("alice", "session", "approve")


@pytest.mark.parametrize(("case", "fields", "headers", "status", "message"), [
    ("no CSRF token", {"decision": "approve"}, {"Origin": "ORIGIN"}, 403, "missing or wrong CSRF token"),
    ("wrong CSRF token", {"decision": "approve", "csrf": "guess"}, {"Origin": "ORIGIN"}, 403, "CSRF"),
    ("another origin", {"decision": "approve", "csrf": "CSRF"}, {"Origin": "http://127.0.0.1:1"}, 403,
     "cross-origin request refused"),
    ("another origin by Referer", {"decision": "approve", "csrf": "CSRF"},
     {"Referer": "http://evil.example/page"}, 403, "cross-origin"),
    ("neither Origin nor Referer", {"decision": "approve", "csrf": "CSRF"}, {}, 403, "must carry Origin"),
    ("a reviewer acting as another user", {"decision": "approve", "csrf": "CSRF", "reviewer": "bob"},
     {"Origin": "ORIGIN"}, 403, "a reviewer acting as another user"),
])
def test_refused_decisions_change_nothing(served, case, fields, headers, status, message):
    browser = Client(served.url)
    browser.login("alice", PASSWORD["alice"])
    fields = {k: browser.csrf if v == "CSRF" else v for k, v in fields.items()}
    headers = {k: served.url if v == "ORIGIN" else v for k, v in headers.items()}
    got, body = browser.decide(served.jobs["done"], fields, headers)
    assert (got, served.decisions) == (status, []), case
    assert message in body["error"]
    assert not [r for r in served.audit() if r["event"] == "review.decision"]


def test_same_origin_by_referer_is_accepted(served):
    browser = Client(served.url)
    browser.login("alice", PASSWORD["alice"])
    status, _ = browser.decide(served.jobs["done"], {"decision": "reject", "csrf": browser.csrf},
                               {"Referer": served.url + "/jobs/1/review"})
    assert status == 200 and served.decisions[0][1:3] == (False, "alice")


def test_roles_are_checked_on_every_endpoint(served):
    curator, ops = Client(served.url), Client(served.url)
    curator.login("carol", PASSWORD["carol"])
    ops.login("olga", PASSWORD["olga"])
    same = {"Origin": served.url}
    status, body = curator.decide(served.jobs["done"], {"decision": "approve", "csrf": curator.csrf}, same)
    assert status == 403 and "carol may not do this (needs role reviewer)" in body["error"]
    assert curator.request("GET", "/api/v1/datasets")[0] == 200
    assert curator.request("POST", f"/api/v1/jobs/{served.jobs['failed']}/retry", b"",
                           {"Origin": served.url, "X-CSRF-Token": curator.csrf})[0] == 403
    assert ops.request("GET", "/api/v1/datasets")[0] == 403
    status, _, body = ops.request("POST", f"/api/v1/jobs/{served.jobs['failed']}/retry", b"",
                                  {"Origin": served.url, "X-CSRF-Token": ops.csrf})
    assert status == 200 and json.loads(body)["state"] == "complete"
    assert served.decisions == []
    [retry] = [r for r in served.audit() if r["event"] == "api.retry"]
    assert (retry["user"], retry["via"]) == ("olga", "session")


def test_machine_clients_keep_bearer_tokens_without_csrf(served):
    client = Client(served.url)
    personal = served.accounts.new_token("alice")
    job = served.jobs["done"]
    status, _, body = client.request("POST", f"/api/v1/jobs/{job}/approve", b'{"comment": "ok"}',
                                     {"Authorization": f"Bearer {personal}"})
    assert status == 200, body
    status, _, body = client.request("POST", f"/api/v1/jobs/{job}/reject", b'{"reviewer": "bob"}',
                                     {"Authorization": f"Bearer {personal}"})
    assert status == 403 and b"acting as another user" in body
    status, _, _ = client.request("POST", f"/api/v1/jobs/{job}/reject", b"{}", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert served.decisions == [(job, True, "alice", "ok"), (job, False, "shared-token", "")]
    records = [(r["reviewer"], r["via"]) for r in served.audit() if r["event"] == "review.decision"]
    assert records == [("alice", "token"), ("shared-token", "token")]
    status, _, _ = client.request("POST", f"/api/v1/jobs/{job}/reject", b"{}",
                                  {"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"})
    assert status == 403 and len(served.decisions) == 2


def test_repeated_wrong_passwords_are_throttled_and_audited(served):
    browser = Client(served.url)
    for _ in range(3):
        assert browser.login("alice", "wrong-password")[0] == 401
    status, headers, body = browser.login("alice", PASSWORD["alice"])  # the right one, but too soon
    assert status == 429 and int(headers["Retry-After"]) > 500 and b"too many failed logins" in body
    assert browser.cookie is None
    other = Client(served.url)  # the same address: throttled for every name
    assert other.login("olga", PASSWORD["olga"])[0] == 429
    events = [r["event"] for r in served.audit() if r["event"].startswith("login")]
    assert events == ["login.failed"] * 3 + ["login.throttled"] * 2


def test_a_removed_user_is_logged_out(served):
    browser = Client(served.url)
    browser.login("olga", PASSWORD["olga"])
    assert browser.request("GET", "/api/v1/jobs")[0] == 200
    served.accounts.remove("olga")
    assert browser.request("GET", "/api/v1/jobs")[0] == 401


def test_secure_cookie_when_asked(tmp_path, served):
    config = HttpConfig(port=0, secure_cookie=True)
    running = start_http(config, served.ops.app(), accounts=served.accounts)
    try:
        status, headers, _ = Client(running.url).login("alice", PASSWORD["alice"])
        assert status == 303 and "; Secure" in headers["Set-Cookie"]
    finally:
        running.stop()


def test_a_node_without_token_or_accounts_refuses_cross_origin_posts_and_anonymous_decisions(tmp_path):
    cfg = NodeConfig(port=0, state_dir=tmp_path / "state", http={"port": 0}, limits={"min_free_disk_mb": 1})
    s = scripted_index(cfg.index_path)
    decisions: list[object] = []
    service = types.SimpleNamespace(config=cfg, index=s.index, rules=RulesHolder(None), scp=None, listeners=[],
                                    remote=None, dicomweb=None, review=lambda *a: decisions.append(a) or "sending")
    ops = Ops(service)
    ops.start()
    try:
        client = Client(ops.http.url)
        assert client.request("GET", "/api/v1/jobs")[0] == 200  # open on loopback, as before accounts
        status, _, body = client.request("POST", f"/api/v1/jobs/{s.jobs['failed']}/retry", b"",
                                         {"Origin": "http://127.0.0.1:1"})
        assert status == 403 and b"cross-origin" in body
        assert s.index.job(s.jobs["failed"]).state.value == "failed"
        status, _, body = client.request("POST", f"/jobs/{s.jobs['done']}/decision", {"decision": "approve"},
                                         {"Origin": ops.http.url})
        assert status == 401 and b"the reviewer is the logged-in user" in body and decisions == []
    finally:
        ops.stop()
