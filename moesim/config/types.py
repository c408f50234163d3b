"""Reusable field types for input models."""

from __future__ import annotations

from typing import Annotated

from pydantic import AllowInfNan, Field

FiniteFloat = Annotated[float, AllowInfNan(False)]
"""A float that must be finite: NaN, ``.inf`` and ``1e999`` are refused at validation."""
PositiveFiniteFloat = Annotated[float, AllowInfNan(False), Field(gt=0)]
"""A finite float > 0."""
NonNegativeFiniteFloat = Annotated[float, AllowInfNan(False), Field(ge=0)]
"""A finite float >= 0."""
