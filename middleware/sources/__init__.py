"""Quota sources: one module per upstream API."""

from .barbican import BarbicanSource
from .base import HTTPSource, QuotaSource
from .static import StaticSource

__all__ = ["BarbicanSource", "HTTPSource", "QuotaSource", "StaticSource"]
