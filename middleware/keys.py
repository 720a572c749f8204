"""Redis key names.

Every key of one project shares the hash tag ``{<project>}`` so that one script touching a
project's keys runs on Redis Cluster. Identities and resource names are percent-encoded: the
encoded form never contains ``{``, ``}``, ``:`` or whitespace, and encoding is injective, so no
input can reach another tenant's keys or move a key to another slot.
"""

from __future__ import annotations

from urllib.parse import quote

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
