"""Who may do what on the ops HTTP server: the roles, the acting user, and a route's ``access``.

Each route of :class:`segnode.node.ops.api.OpsApp` is ``(verb, pattern, handler, access)``:

* ``None``: public (``/healthz``, ``/readyz``, ``/login``);
* ``True``: any authenticated user;
* a :class:`Role`, or a ``frozenset`` of them: a user holding one of these roles.

``admin`` may do everything.  The shared bearer token of ``http.token_file``
acts as the machine principal ``shared-token`` with the roles ``admin`` and ``ops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Role(StrEnum):
    REVIEWER = "reviewer"  # decides held jobs, reads jobs
    OPS = "ops"  # retries jobs, validates routes, fetches studies
    CURATOR = "curator"  # reads (and corrects) datasets
    ADMIN = "admin"  # everything


#: what a route asks of the acting user (see the module docstring)
Access = None | Literal[True] | Role | frozenset[Role]

#: how the principal authenticated: a login session cookie, or a bearer token (personal or shared)
Via = Literal["session", "token"]


@dataclass(frozen=True)
class Principal:
    """The acting user of a request: a person logged in, or a machine holding a token."""

    name: str
    roles: frozenset[Role]
    via: Via

    def may(self, access: Access) -> bool:
        """Does this principal satisfy a route's ``access``?"""
        if access is None or access is True:
            return True
        if Role.ADMIN in self.roles:
            return True
        wanted = frozenset({access}) if isinstance(access, Role) else access
        return bool(self.roles & wanted)


def parse_role(value: str | Role) -> Role:
    """``"reviewer"`` → :attr:`Role.REVIEWER`; raises ``ValueError`` naming the roles."""
    try:
        return Role(value)
    except ValueError:
        raise ValueError(f"unknown role {value!r}; one of {', '.join(r.value for r in Role)}") from None


#: the machine principal of the shared bearer token (``http.token_file``)
TOKEN_PRINCIPAL = Principal("shared-token", frozenset({Role.ADMIN, Role.OPS}), "token")
