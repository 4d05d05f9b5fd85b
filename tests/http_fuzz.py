"""Seeded hostile HTTP requests for the node's two listeners (the ops API, the DICOMweb server).

:func:`cases` turns a list of valid :class:`RawRequest` templates (one per
endpoint) into a bounded, reproducible list of :class:`Case`: each case is a
template mutated 1–3 times (request line, headers, body, JSON, multipart, path
tricks) or one of a few fixed hostile shapes (garbage, slow-loris, oversized).
Every case says what a correct server may answer (:class:`Expect`).  Used by
``tests/node/http_in/test_fuzz_http.py``; the soak (``bench/soak.py``) sends a
few of the same cases as its hostile connections.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum


class Expect(Enum):
    """What a correct server answers to a case."""

    ANY = "any"  # a mutation that may still be valid: any answer but an unmeant 5xx, or a clean close
    REFUSED = "refused"  # malformed: a 4xx with a reason (a body), or a clean close
    DEADLINE = "deadline"  # slow: the server closes the connection at its deadline


@dataclass(frozen=True)
class RawRequest:
    """An HTTP/1.1 request as parts, so that each part can be mutated on its own."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""
    version: bytes = b"HTTP/1.1"
    eol: bytes = b"\r\n"
    raw_headers: tuple[bytes, ...] = ()  # extra header lines sent verbatim (no colon, folded, ...)

    def encode(self) -> bytes:
        line = b" ".join(p for p in (self.method, self.target, self.version) if p)
        heads = [name + b": " + value for name, value in self.headers] + list(self.raw_headers)
        return self.eol.join([line, *heads, b"", b""]) + self.body

    def with_header(self, name: bytes, value: bytes) -> RawRequest:
        kept = tuple((n, v) for n, v in self.headers if n.lower() != name.lower())
        return replace(self, headers=(*kept, (name, value)))


def request(method: str, target: str, *, body: bytes = b"", headers: Sequence[tuple[str, str]] = (),
            token: str | None = None) -> RawRequest:
    """A valid request: Host, the bearer token, Content-Length for a body."""
    heads = [("Host", "127.0.0.1"), *headers]
    if token is not None:
        heads.append(("Authorization", f"Bearer {token}"))
    if body or method == "POST":
        heads.append(("Content-Length", str(len(body))))
    return RawRequest(method.encode(), target.encode(), tuple((n.encode(), v.encode()) for n, v in heads), body)


@dataclass(frozen=True)
class Case:
    """One connection: ``chunks`` sent with ``pause_s`` between them, then (maybe) a half-close."""

    number: int
    what: str  # the template and mutations, for the report
    chunks: tuple[bytes, ...]
    expect: Expect = Expect.ANY
    pause_s: float = 0.0
    half_close: bool = True
    allowed_5xx: frozenset[int] = field(default_factory=frozenset)


# -- multipart -----------------------------------------------------------------------------


def multipart(parts: Sequence[tuple[dict[str, str], bytes]], boundary: str) -> bytes:
    out = bytearray()
    for headers, data in parts:
        out += f"--{boundary}\r\n".encode()
        out += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def stow_request(target: str, token: str, instances: Sequence[bytes], boundary: str = "fuzz-boundary-0001"
                 ) -> RawRequest:
    body = multipart([({"Content-Type": "application/dicom"}, data) for data in instances], boundary)
    return request("POST", target, body=body, token=token, headers=[
        ("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')])


# -- mutations -----------------------------------------------------------------------------------

Mutation = Callable[[random.Random, RawRequest], RawRequest]

METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"get",
           b"G\x00T", b"GET\xff", b"X" * 300, b"", b"BREW", b"PRI")
VERSIONS = (b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/1", b"HTTP/", b"http/1.1", b"HTTP/1.1 extra",
            b"HTTP/99999999999999999999.1", b"HTTP/1.\xff", b"", b"FTP/1.1")
PATH_TRICKS = (
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/%252e%252e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
    "/%c0%ae%c0%ae/etc/passwd", "/%00", "/a%00b", "/healthz%00", "/%ff%fe", "//healthz", "/healthz/",
    "/./healthz", "/healthz/..", "\\..\\..\\windows", "*", "http://evil.example/healthz", "/?" + "a=1&" * 3000,
    "/api/v1/jobs?limit=" + "9" * 40, "/api/v1/jobs?state=%ff", "/api/v1/jobs?limit=-1", "/api/v1/jobs?limit=1e3",
    "/api/v1/jobs/99999999999999999999999999", "/api/v1/jobs/\u00b2", "/jobs/\u00b9/review",
    "/api/v1/jobs/%C2%B2", "/api/v1/jobs/-1", "/api/v1/jobs/0x10", "/api/v1/studies/" + "1." * 200 + "1",
    "/jobs/1/review/..%2f..%2f..%2fetc%2fpasswd", "/jobs/1/review/%2e%2e", "/jobs/1/review/.png",
    "/dicomweb/studies/../../etc", "/dicomweb/studies/1.2/series/%2e%2e", "/dicomweb/studies/" + "9" * 70,
    "/remote/v1/jobs/999999999999999/result", "/remote/v1/jobs/1/result/..", "/dicomweb/studies/1.2.3/series",
    "/dicomweb/studies/1.2.3/series/1.2.4/instances", "/dicomweb/studies/1.2.3/metadata", "/" + "a" * 70000,
    "/%", "/%%", "/%g1", "/ /", "/\t", "/a\rb", "/\u00e9".encode().decode("latin-1"),
)
CONTENT_LENGTHS = (b"-1", b"+5", b" 5", b"5 ", b"0x10", b"1e3", b"", b"\xc2\xb2", b"\xd9\xa3", b"99999999999999999999",
                   b"18446744073709551616", b"1,2", b"00000000000000000000001", b"4294967296", b"\x00", b"\xb2", b"1\xb9")
AUTHS = (b"Bearer", b"Bearer ", b"Basic !!!!", b"Basic " + b"QQ==" * 5000, b"Bearer " + b"x" * 70000,
         b"Bearer \xff\xfe", b"Basic Og==", b"Digest x", b"bearer job.1.x", b"Bearer job.", b"Bearer job.1",
         b"Bearer job.\xb2.1.mac", b"Bearer job.1.\xb9.mac", b"Bearer job.99999999999999999999999.1.mac")
CONTENT_TYPES = (b"multipart/related", b"multipart/related; boundary=", b'multipart/related; boundary=""',
                 b"multipart/related; boundary=" + b"b" * 5000, b'multipart/related; type="text/plain"; boundary=x',
                 b"multipart/related; boundary=x; boundary=y", b"application/json", b"multipart/related; boundary=\xff",
                 b'multipart/related; type="application/dicom"; boundary="unterminated', b";;;;", b"\x00")
TRANSFER_ENCODINGS = (b"chunked", b"gzip, chunked", b"chunked, gzip", b"xchunked", b"CHUNKED", b" chunked ",
                      b"identity", b"chunked\x00")


def _method(rng: random.Random, req: RawRequest) -> RawRequest:
    return replace(req, method=rng.choice(METHODS))


def _version(rng: random.Random, req: RawRequest) -> RawRequest:
    return replace(req, version=rng.choice(VERSIONS))


def _path(rng: random.Random, req: RawRequest) -> RawRequest:
    trick = rng.choice(PATH_TRICKS).encode("latin-1")
    if rng.random() < 0.5:
        return replace(req, target=trick)
    return replace(req, target=req.target + trick if rng.random() < 0.5 else trick + req.target)


def _target_bytes(rng: random.Random, req: RawRequest) -> RawRequest:
    target = bytearray(req.target)
    if target:
        target[rng.randrange(len(target))] = rng.choice(b"\x00\x7f\x80\xff %?#/\\.;")
    return replace(req, target=bytes(target))


def _eol(rng: random.Random, req: RawRequest) -> RawRequest:
    return replace(req, eol=rng.choice((b"\n", b"\r", b"\r\r\n", b"\n\r")))


def _content_length(rng: random.Random, req: RawRequest) -> RawRequest:
    return req.with_header(b"Content-Length", rng.choice(CONTENT_LENGTHS))


def _length_off(rng: random.Random, req: RawRequest) -> RawRequest:
    """Content-Length larger (the body ends early) or smaller (the rest is read as the next request)."""
    delta = rng.choice((-100, -10, -1, 1, 10, 1000))
    return req.with_header(b"Content-Length", str(max(len(req.body) + delta, 0)).encode())


def _duplicate_length(rng: random.Random, req: RawRequest) -> RawRequest:
    return replace(req, headers=(*req.headers, (b"Content-Length", str(len(req.body) + rng.randrange(1, 50)).encode())))


def _chunked(rng: random.Random, req: RawRequest) -> RawRequest:
    """The body re-sent chunked, with a trick: bad sizes, extensions, no last chunk, a Content-Length too."""
    body, out = req.body, bytearray()
    for start in range(0, len(body), 4096):
        piece = body[start:start + 4096]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    trick = rng.randrange(7)
    if trick == 0:
        out = bytearray(rng.choice((b"zz\r\n", b"-1\r\n", b"ffffffffffffffffffff\r\n", b"\r\n", b"1;" + b"e" * 9000 + b"\r\n")))
    elif trick == 1:
        out = b"%x;name=value\r\n" % len(body) + body + b"\r\n"
    elif trick != 2:  # trick 2: no last chunk
        out += b"0\r\n\r\n"
    heads = tuple((n, v) for n, v in req.headers if n.lower() != b"content-length")
    if trick == 3:
        heads += ((b"Content-Length", str(len(body)).encode()),)
    return replace(req, headers=(*heads, (b"Transfer-Encoding", rng.choice(TRANSFER_ENCODINGS))), body=bytes(out))


def _huge_header(rng: random.Random, req: RawRequest) -> RawRequest:
    size = rng.choice((8000, 65000, 70000, 200000))
    return replace(req, headers=(*req.headers, (b"X-Fuzz", b"v" * size)))


def _many_headers(rng: random.Random, req: RawRequest) -> RawRequest:
    extra = tuple((b"X-H%d" % k, b"v") for k in range(rng.choice((99, 101, 500))))
    return replace(req, headers=(*req.headers, *extra))


def _bad_header_line(rng: random.Random, req: RawRequest) -> RawRequest:
    line = rng.choice((b"no colon here", b" folded continuation", b"\tfolded", b": empty name", b"X-\xff\xfe: v",
                       b"X-A: \xff\xfe\xc3\x28", b"X-A: a\x00b", b"Host: a\r\nHost: b", b"X Y: z", b"\x00: \x00"))
    return replace(req, raw_headers=(*req.raw_headers, line))


def _authorization(rng: random.Random, req: RawRequest) -> RawRequest:
    return req.with_header(b"Authorization", rng.choice(AUTHS))


def _drop_header(rng: random.Random, req: RawRequest) -> RawRequest:
    if not req.headers:
        return req
    k = rng.randrange(len(req.headers))
    return replace(req, headers=req.headers[:k] + req.headers[k + 1:])


def _content_type(rng: random.Random, req: RawRequest) -> RawRequest:
    return req.with_header(b"Content-Type", rng.choice(CONTENT_TYPES))


def _body_bytes(rng: random.Random, req: RawRequest) -> RawRequest:
    body = bytearray(req.body or b"{}")
    for _ in range(rng.randint(1, 8)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return _fix_length(replace(req, body=bytes(body)))


def _body_cut(rng: random.Random, req: RawRequest) -> RawRequest:
    body = req.body[:rng.randrange(len(req.body))] if req.body else b""
    return _fix_length(replace(req, body=body)) if rng.random() < 0.5 else replace(req, body=body)


JSON_BODIES = (b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"reviewer": 1}', b'{"reviewer": null, "comment": []}',
               b'{"reviewer": "' + b"r" * 100 + b'"}', b'{"reviewer": "a", "comment": "' + b"c" * 600 + b'"}',
               b'{"reviewer": "\xff\xfe"}', b'{"reviewer": "\\ud800"}', b"[" * 100000 + b"]" * 100000,
               b'{"a":' * 50000 + b"1" + b"}" * 50000, b'{"reviewer": "a", "reviewer": "b"}', b"1" * 5000,
               b'{"reviewer": 1e999999}', b"\xef\xbb\xbf{}", b"NaN")
YAML_BODIES = (b"rules: [", b"rules:\n  - name: x\n", b"- " * 20000 + b"x", b"[" * 50000, b"{" * 50000,
               b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: &d [*c, *c]\ne: [*d, *d]\n",
               b"!!python/object/apply:os.system ['true']", b"\xff\xfe\x00", b"rules: 5", b"%YAML 9.9\n---\n",
               b"rules:\n  - name: " + b"n" * 100000 + b"\n")
FORM_BODIES = (b"decision=approve&reviewer=r", b"decision=maybe", b"decision=approve&reviewer=" + b"r" * 70,
               b"%ff%fe=%00", b"&" * 10000, b"decision=reject&reviewer=%ff", b"=" * 1000)


def _json_body(rng: random.Random, req: RawRequest) -> RawRequest:
    return _fix_length(replace(req, body=rng.choice(JSON_BODIES + YAML_BODIES + FORM_BODIES)))


def _multipart_body(rng: random.Random, req: RawRequest) -> RawRequest:
    """A multipart trick with the request's own boundary (parsed back from its Content-Type)."""
    ctype = dict((n.lower(), v) for n, v in req.headers).get(b"content-type", b"")
    boundary = ctype.rpartition(b"boundary=")[2].strip(b'"') or b"fuzz-boundary-0001"
    instance = _first_part(req.body, boundary)
    b = boundary
    bodies = (
        b"--" + b + b"\r\n\r\n" + instance + b"\r\n--" + b + b"--\r\n",  # a part with no headers
        b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + instance,  # no closing delimiter
        b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + instance[:len(instance) // 2],  # truncated
        b"preamble junk\r\n--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + instance + b"\r\n--" + b + b"--",
        b"--" + b + b"\r\nContent-Type: multipart/related; boundary=inner\r\n\r\n--inner\r\nContent-Type: "
        b"application/dicom\r\n\r\n" + instance + b"\r\n--inner--\r\n\r\n--" + b + b"--\r\n",  # nested
        b"--" + b + b"\r\n" + b"X-H: v\r\n" * 3000 + b"\r\nx\r\n--" + b + b"--\r\n",  # a huge part header block
        (b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\nx\r\n") * 300 + b"--" + b + b"--\r\n",  # many parts
        b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00" * 200 + b"\r\n--" + b + b"--\r\n",
        b"--" + b + b"--\r\n",  # no parts
        b"--wrong\r\nContent-Type: application/dicom\r\n\r\n" + instance + b"\r\n--wrong--\r\n",
        b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n--" + b + b"\r\n--" + b + b"--\r\n",
        b"--" + b,
        b"--" + b + b"\r\nContent-Type: application/dicom\r\nContent-Length: 5\r\n\r\n" + instance + b"\r\n--" + b + b"--",
    )
    return _fix_length(replace(req, body=rng.choice(bodies)))


def _first_part(body: bytes, boundary: bytes) -> bytes:
    head_end = body.find(b"\r\n\r\n")
    end = body.find(b"\r\n--" + boundary, head_end)
    return body[head_end + 4:end] if head_end >= 0 and end > head_end else b"DICM"


def _fix_length(req: RawRequest) -> RawRequest:
    if any(n.lower() == b"transfer-encoding" for n, _ in req.headers):
        return req
    return req.with_header(b"Content-Length", str(len(req.body)).encode())


MUTATIONS: tuple[Mutation, ...] = (
    _method, _version, _path, _path, _target_bytes, _eol, _content_length, _length_off, _duplicate_length, _chunked,
    _chunked, _huge_header, _many_headers, _bad_header_line, _bad_header_line, _authorization, _authorization,
    _drop_header, _content_type, _body_bytes, _body_cut, _json_body, _json_body, _multipart_body, _multipart_body,
)


# -- fixed hostile shapes ------------------------------------------------------------------------------


def _garbage(rng: random.Random) -> bytes:
    return rng.choice((b"", b"\r\n", b"\r\n" * 50, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
                       b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))),
                       b"GET\r\n\r\n", b"GET /\r\n\r\n", b" / HTTP/1.1\r\n\r\n", b"\x00" * 1000))


def slow_cases(templates: Sequence[RawRequest], start: int, rng: random.Random, deadline_s: float) -> list[Case]:
    """Slow-loris shapes: headers dribbled past the deadline, an idle connection, a stalled body."""
    cases, pause = [], deadline_s / 3
    for k, template in enumerate(templates):
        head = template.encode()
        shape = k % 3
        if shape == 0:  # a byte at a time, never finishing the headers
            chunks = tuple(head[i:i + 1] for i in range(min(len(head) - 4, 12)))
        elif shape == 1:  # connect and say nothing
            chunks = (b"",)
        else:  # headers promise a body that never comes
            stalled = template.with_header(b"Content-Length", b"100000")
            chunks = (stalled.encode()[:len(stalled.encode()) - len(stalled.body)] + b"x" * 10,)
        cases.append(Case(start + k, f"slow:{['dribble', 'idle', 'stalled-body'][shape]}:"
                          f"{template.method.decode()} {template.target.decode()}", chunks, Expect.DEADLINE,
                          pause_s=pause, half_close=False))
    rng.shuffle(cases)
    return cases


def cases(templates: Sequence[RawRequest], count: int, seed: str, *, slow: Sequence[RawRequest] = (),
          deadline_s: float = 1.0, allowed_5xx: frozenset[int] = frozenset({501, 503, 505})) -> list[Case]:
    """``count`` seeded cases over ``templates``, plus one slow case per request in ``slow``."""
    out = []
    for number in range(count):
        rng = random.Random(f"{seed}-{number}")
        roll = rng.random()
        if roll < 0.03:
            out.append(Case(number, "garbage", (_garbage(rng),), Expect.REFUSED, allowed_5xx=allowed_5xx))
            continue
        template = rng.choice(templates)
        if roll < 0.06:  # oversized: a declared length far past every cap
            req = template.with_header(b"Content-Length", rng.choice((b"1099511627776", b"999999999999999")))
            out.append(Case(number, f"oversized {template.target.decode()}", (req.encode(),), Expect.ANY,
                            allowed_5xx=allowed_5xx))
            continue
        names = []
        req = template
        for _ in range(rng.randint(1, 3)):
            mutation = rng.choice(MUTATIONS)
            names.append(mutation.__name__.lstrip("_"))
            req = mutation(rng, req)
        out.append(Case(number, f"{template.method.decode()} {template.target.decode()}: {'+'.join(names)}",
                        (req.encode(),), Expect.ANY, allowed_5xx=allowed_5xx))
    rng = random.Random(f"{seed}-slow")
    for case in slow_cases(slow, count, rng, deadline_s):  # spread among the others
        out.insert(rng.randrange(len(out) + 1), case)
    return out


# -- sending a case --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the server sent back, and how the connection ended."""

    data: bytes
    closed_after_s: float | None  # None: still open after the timeout (a hang)
    reset: bool = False  # the server reset the connection (closed with our bytes unread)

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/"):
            return None
        try:
            return int(self.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    def statuses(self) -> list[int]:
        """Every status line in the answer (a kept-alive connection may answer several requests)."""
        found = []
        for line in self.data.split(b"\r\n"):
            if line.startswith(b"HTTP/1.") and len(line) > 12 and line[9:12].isdigit():
                found.append(int(line[9:12]))
        return found


def send(port: int, case: Case, timeout_s: float, monotonic: Callable[[], float], pause: Callable[[float], None]
         ) -> Answer:
    """Send ``case`` on a fresh connection and read until the server closes it (or ``timeout_s``)."""
    data, reset = bytearray(), False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        started = monotonic()
        try:
            for k, chunk in enumerate(case.chunks):
                if k and case.pause_s:
                    pause(case.pause_s)
                if chunk:
                    sock.sendall(chunk)
            if case.half_close:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:  # the server has closed already (ENOTCONN): read what it sent
                    pass
            while piece := sock.recv(65536):
                data += piece
        except TimeoutError:
            return Answer(bytes(data), None)
        except (ConnectionResetError, BrokenPipeError):
            reset = True
            try:  # what the server answered before the reset may still be readable
                sock.settimeout(0.5)
                while piece := sock.recv(65536):
                    data += piece
            except OSError:
                pass
        return Answer(bytes(data), monotonic() - started, reset)


def problems(case: Case, answer: Answer, deadline_s: float) -> list[str]:
    """What is wrong with ``answer`` to ``case`` (empty: nothing)."""
    if answer.closed_after_s is None:
        return [f"case {case.number} ({case.what}): still open after the timeout (hang)"]
    out = []
    for status in answer.statuses():
        if status >= 500 and status not in case.allowed_5xx:
            out.append(f"case {case.number} ({case.what}): answered {status}: {answer.body[:200]!r}")
    status = answer.status
    if answer.data and status is None:
        out.append(f"case {case.number} ({case.what}): not an HTTP answer: {answer.data[:80]!r}")
    head = case.chunks[0].startswith(b"HEAD ")  # answered without a body, by definition
    if status is not None and status >= 400 and not answer.body.strip() and status != 503 and not head \
            and not answer.reset:
        out.append(f"case {case.number} ({case.what}): {status} without a reason")
    if case.expect is Expect.REFUSED and status is not None and not 400 <= status < 600:
        out.append(f"case {case.number} ({case.what}): malformed, yet answered {status}")
    if case.expect is Expect.DEADLINE and answer.closed_after_s > deadline_s * 3 + 5:
        out.append(f"case {case.number} ({case.what}): closed after {answer.closed_after_s:.1f} s, "
                   f"deadline {deadline_s} s")
    return out
