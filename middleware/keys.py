"""Redis key names, and the format of a lease member: everything that knows the key layout is here
(batch.lua follows it; see its header).

Every key of one project shares the hash tag ``{<project>}`` so that one script touching a
project's keys runs on Redis Cluster. Identities and resource names are percent-encoded: the
encoded form never contains ``{``, ``}``, ``:`` or whitespace, and encoding is injective, so no
input can reach another tenant's keys or move a key to another slot.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

# Only unreserved characters stay readable; '%' itself is encoded, which keeps the mapping injective.
_SAFE = "-._~"


def escape(value: str) -> str:
    """Percent-encode ``value`` (UTF-8) so it can stand inside a key between ':' separators."""
    return quote(value, safe=_SAFE)


def project_tag(prefix: str, project: str) -> str:
    """The common start of every key of ``project``: ``<prefix>{<escaped project>}``."""
    return f"{prefix}{{{escape(project)}}}"


def counter_keys(prefix: str, project: str, resource: str, window: int | None = None) -> tuple[str, str, str]:
    """(usage counter, lease set, settled set) of one project, resource and (optional) window start."""
    base = bucket_base(prefix, project, resource, window)
    return f"{base}:used", f"{base}:leases", f"{base}:settled"


def member(reservation_id: str, cost: int) -> str:
    """A lease member: the reservation's id with its cost appended, so that an expiring lease
    knows what to give back (batch.lua reads the cost the same way)."""
    return f"{reservation_id}:{cost}"


def member_id(value: str) -> str:
    """The reservation id a lease member carries (a group's id, for each of its leases)."""
    return value.rpartition(":")[0]


def member_cost(value: bytes | str) -> int:
    """The cost a lease member carries (0 for a member not of this format)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    _, _, cost = text.rpartition(":")
    return int(cost) if cost.isdigit() else 0


def parse_counter_key(prefix: str, project: str, key: bytes | str) -> tuple[str, int | None] | None:
    """(resource, window start) of a bucket's usage counter or lease set key; None for other keys."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    tag = project_tag(prefix, project) + ":"
    if not text.startswith(tag):
        return None
    # Escaped resource names never contain ':', so the parts are unambiguous.
    parts = text[len(tag):].split(":")
    if len(parts) == 2 and parts[1] in ("used", "leases"):
        return unquote(parts[0]), None
    if (len(parts) == 3 and parts[2] in ("used", "leases") and parts[1][:1] == "w"
            and parts[1][1:].lstrip("-").isdigit()):
        return unquote(parts[0]), int(parts[1][1:])
    return None


def project_pattern(prefix: str, project: str) -> str:
    """A SCAN pattern for every key of ``project`` (glob characters in the tag escaped)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in project_tag(prefix, project)) + ":*"


def parse_quotas_key(prefix: str, project: str, key: bytes | str) -> str | None:
    """The source namespace of a shared quotas copy's key; None for any other key."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    start = project_tag(prefix, project) + ":quotas:"
    if not text.startswith(start) or ":" in text[len(start):]:
        return None  # another key, or the copy's :lock or :backoff
    return unquote(text[len(start):])


def bucket_base(prefix: str, project: str, resource: str, window: int | None = None) -> str:
    base = f"{project_tag(prefix, project)}:{escape(resource)}"
    return base if window is None else f"{base}:w{window}"


def commits_key(prefix: str, project: str, resource: str, window: int | None = None) -> str:
    """The bucket's running total of committed units (read by reconciliations)."""
    return f"{bucket_base(prefix, project, resource, window)}:commits"


def quotas_key(prefix: str, project: str, namespace: str) -> str:
    """Where the shared copy of a project's effective quotas from one source lives."""
    return f"{project_tag(prefix, project)}:quotas:{escape(namespace)}"


def shared_key(prefix: str, project: str, namespace: str, part: str) -> str:
    """What the quota cache shares: the quotas copy, the source's ``backoff``, the fetch ``lock``."""
    key = quotas_key(prefix, project, namespace)
    return key if part == "quotas" else f"{key}:{part}"


def overrides_key(prefix: str, project: str) -> str:
    """The project's quota overrides: a hash of escaped resource name -> limit in quota units."""
    return f"{project_tag(prefix, project)}:overrides"


def overridden_projects_key(prefix: str) -> str:
    """The set of projects that have overrides (for listing them; outside any project's slot)."""
    return f"{prefix}overridden-projects"
