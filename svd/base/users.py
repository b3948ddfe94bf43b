"""Who is asking: the users SVD_API_TOKENS names, the admin SVD_API_TOKEN names, and what each may see.

Every job and kept video belongs to the user who made it (its `owner`); a user sees only their
own, the admin everything. With no token set the service is open and everyone is the admin, as
before users existed. Users are named in the configuration only, so a name is safe to log and to
use as a metric's label; a token never is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What a user's name may be: it is logged, stored with each job and a label of the metrics.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The admin's name, as its jobs and videos record it.
ADMIN = "admin"
# The owner of what an open service (no token set) makes, and of what was made before users existed.
NOBODY = ""


@dataclass(frozen=True)
class Caller:
    """The user a request comes from; `admin` sees and cancels everything."""

    name: str
    admin: bool = False

    def sees(self, owner: str | None) -> bool:
        """Whether this caller may see, follow and cancel what `owner` made."""
        return self.admin or owner == self.name


# Everyone, when no token is set.
OPEN = Caller(NOBODY, admin=True)


def parse_users(text: str, source: str) -> dict[str, str]:
    """`name:token` pairs, separated by commas or new lines (blank lines and `#` comments skipped), as
    name -> token; ValueError saying which entry of `source` is wrong, and never showing a token."""
    users: dict[str, str] = {}
    tokens: set[str] = set()
    entries = [entry.strip() for line in text.splitlines() for entry in line.split("#")[0].split(",")]
    for number, entry in enumerate((entry for entry in entries if entry), start=1):
        name, colon, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not colon or not token:
            raise ValueError(f"{source}: entry {number} is not `name:token`")
        if not NAME.fullmatch(name) or name == ADMIN:
            raise ValueError(
                f"{source}: entry {number} names the user {name[:64]!r}; a name is 1 to 64 letters, digits, `_`, `.` "
                f"or `-`, and `{ADMIN}` is SVD_API_TOKEN's"
            )
        if name in users:
            raise ValueError(f"{source}: the user {name!r} is named twice")
        if token in tokens:
            raise ValueError(f"{source}: the user {name!r} has another user's token; each needs their own")
        users[name] = token
        tokens.add(token)
    return users


def label_of(owner: str, names: frozenset[str]) -> str:
    """A metric label for `owner`: its name when the configuration names it, so that the labels are
    bounded; `anonymous` on an open service, `other` for a user since removed."""
    if owner == NOBODY:
        return "anonymous"
    return owner if owner in names or owner == ADMIN else "other"
