"""People who use the ops HTTP server: accounts with roles, scrypt-hashed passwords, personal API tokens.

Kept in ``<state_dir>/accounts.db`` (SQLite, created ``0600``).  Passwords are
hashed with :func:`hashlib.scrypt` (memory-hard, a random salt per user) and
compared in constant time; personal API tokens are random, shown once, and
stored only as their SHA-256 (a token has 256 bits of entropy: a fast hash is
enough, and lets a request find its user with one lookup).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segnode.errors import ConfigError, InputError, StorageError
from segnode.node.ops.roles import Principal, Role, parse_role

#: scrypt cost: 2**14 x 8 x 128 bytes = 16 MiB of memory per hash
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MIN_PASSWORD = 10
NAME = re.compile(r"[A-Za-z][A-Za-z0-9._@-]{0,63}")
TOKEN_PREFIX = "sgn_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, roles TEXT NOT NULL, salt BLOB, hash BLOB, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY, name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at REAL NOT NULL);
"""


@dataclass(frozen=True)
class Account:
    name: str
    roles: frozenset[Role]
    has_password: bool
    tokens: int
    created_at: float


def hash_password(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=64 * 1024 * 1024, dklen=32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InputError(f"user name {name!r} must be 1-64 characters: a letter, then letters, digits, . _ @ -")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise InputError(f"the password must be at least {MIN_PASSWORD} characters")
    return password


class AccountStore:
    """The accounts file; each call opens its own connection (the HTTP server has a thread per request)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._dummy_salt = secrets.token_bytes(16)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> "AccountStore":
        return cls(Path(state_dir) / "accounts.db")

    def _connect(self, *, create: bool = False) -> sqlite3.Connection:
        if not self.path.exists():
            if not create:
                raise StorageError("no accounts yet: add one with `segnode users add`", where=str(self.path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            conn = sqlite3.connect(self.path, timeout=10)
            conn.execute("PRAGMA foreign_keys = ON")
            if create:  # the administration commands: the schema, and the file private
                conn.executescript(_SCHEMA)
                os.chmod(self.path, 0o600)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the accounts file: {exc}", where=str(self.path)) from exc
        return conn

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One transaction of the administration commands; SQLite errors as :class:`StorageError`."""
        try:
            with closing(self._connect(create=True)) as conn, conn:
                yield conn
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write the accounts file: {exc}", where=str(self.path)) from exc

    # -- administration (the CLI) ----------------------------------------------------------
    def add(self, name: str, roles: frozenset[Role], password: str | None = None) -> Account:
        check_name(name)
        if not roles:
            raise InputError("give the user at least one role")
        salt = secrets.token_bytes(16) if password is not None else None
        digest = hash_password(check_password(password), salt) if password is not None and salt else None
        with self._writing() as conn:
            try:
                conn.execute("INSERT INTO users VALUES (?, ?, ?, ?, ?)",
                             (name, _roles_text(roles), salt, digest, time.time()))
            except sqlite3.IntegrityError:
                raise InputError(f"user {name!r} exists already") from None
        return self.get(name)

    def remove(self, name: str) -> None:
        with self._writing() as conn:
            if conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise InputError(f"no user {name!r}")

    def new_token(self, name: str) -> str:
        """A new personal API token for ``name`` (returned once; only its digest is kept)."""
        self.get(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._writing() as conn:
            conn.execute("INSERT INTO tokens VALUES (?, ?, ?)", (token_digest(token), name, time.time()))
        return token

    def get(self, name: str) -> Account:
        found = [a for a in self.users() if a.name == name]
        if not found:
            raise InputError(f"no user {name!r}")
        return found[0]

    def users(self) -> list[Account]:
        rows = self._read("SELECT u.name, u.roles, u.hash IS NOT NULL, COUNT(t.digest), u.created_at "
                          "FROM users u LEFT JOIN tokens t ON t.name = u.name GROUP BY u.name ORDER BY u.name")
        return [Account(r[0], _roles_of(r[1]), bool(r[2]), int(r[3]), float(r[4])) for r in rows]

    def exists(self, name: str) -> bool:
        return self._row(name) is not None

    def any(self) -> bool:
        """Are there accounts (then the HTTP server needs a login)?  Asked on every request."""
        return bool(self._read("SELECT 1 FROM users LIMIT 1"))

    # -- authentication (the HTTP server) ---------------------------------------------------
    def check_password(self, name: str, password: str) -> Principal | None:
        """The user if ``password`` is theirs; the same scrypt work is done for an unknown user."""
        row = self._row(name) if NAME.fullmatch(name) else None
        salt, digest = self._dummy_salt, b"\0" * 32
        if row is not None and row[1] is not None and row[2] is not None:
            salt, digest = row[1], row[2]
        good = hmac.compare_digest(hash_password(password, salt), digest)
        if not good or row is None:
            return None
        return Principal(name, _roles_of(row[0]), "session")

    def principal_for_token(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        rows = self._read("SELECT u.name, u.roles FROM tokens t JOIN users u ON u.name = t.name "
                          "WHERE t.digest = ?", (token_digest(token),))
        return Principal(rows[0][0], _roles_of(rows[0][1]), "token") if rows else None

    def _row(self, name: str) -> tuple[str, bytes | None, bytes | None] | None:
        rows = self._read("SELECT roles, salt, hash FROM users WHERE name = ?", (name,))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def _read(self, sql: str, params: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query; none before the file exists; SQLite errors as :class:`StorageError`."""
        if not self.path.exists():
            return []
        try:
            with closing(self._connect()) as conn:
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the accounts file: {exc}", where=str(self.path)) from exc


def _roles_text(roles: frozenset[Role]) -> str:
    return ",".join(sorted(r.value for r in roles))


def _roles_of(text: str) -> frozenset[Role]:
    try:
        return frozenset(parse_role(r) for r in text.split(",") if r)
    except ValueError as exc:
        raise ConfigError(f"accounts file: {exc}") from exc
