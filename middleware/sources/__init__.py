"""Quota sources: one module per upstream API."""

from .barbican import BarbicanSource
from .base import HTTPSource, QuotaSource
from .captaindata import CaptainDataSource
from .generic import JSONSource
from .keystone import KeystoneLimitsSource
from .latitude import LatitudeSource
from .static import StaticSource

__all__ = ["BarbicanSource", "CaptainDataSource", "HTTPSource", "JSONSource", "KeystoneLimitsSource",
           "LatitudeSource", "QuotaSource", "StaticSource"]
