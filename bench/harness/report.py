"""What every report says: the environment of the run, and the arithmetic of its tables."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path


def fmt(n: float) -> str:
    return f"{n:,.0f}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (values need not be sorted); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_of_medians(values: Sequence[float], base: Sequence[float]) -> float:
    return median(values) / median(base)


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """The median of the per-round ratios: each pair measured seconds apart, so drift cancels."""
    return median([a / b for a, b in zip(values, base, strict=True)])


def paired_difference(values: Sequence[float], base: Sequence[float]) -> float:
    """The median of the per-round differences (e.g. worker CPU us per request over the baseline's)."""
    return median([a - b for a, b in zip(values, base, strict=True)])


def middleware_origin() -> Path | None:
    """The tree the ``middleware`` package is imported from here: PYTHONPATH's, else the venv's
    editable install (the tree whose .venv this is). Subprocesses started with this environment
    import the same one."""
    spec = importlib.util.find_spec("middleware")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent.parent


def git_state(tree: Path | None = None) -> str:
    """``<tree> at <short hash> (clean)``, or with how many middleware files are changed."""
    tree = tree or middleware_origin()
    if tree is None:
        return "middleware not importable"
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "middleware"],
                               capture_output=True, text=True, timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{tree} (not a git tree?)"
    state = f" + uncommitted changes in {len(dirty)} middleware file(s)" if dirty else " (clean)"
    return f"{tree} at {head or '?'}{state}"


def versions(*packages: str) -> str:
    out = []
    for p in packages:
        try:
            out.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{p} -")
    return ", ".join(out)


def environment(*packages: str) -> str:
    """One line: Python, the packages that matter, CPUs, redis-server, and which middleware is measured."""
    try:
        words = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
        redis = next((w[2:] for w in words if w.startswith("v=")), "?")
    except OSError:
        redis = "not installed"
    return (f"python {platform.python_version()}, {versions(*packages)}; {os.cpu_count()} CPUs; "
            f"redis-server {redis}; middleware from {git_state()}")
