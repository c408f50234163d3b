"""Reusable field types for input models."""

from __future__ import annotations

from typing import Annotated

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field

FiniteFloat = Annotated[float, AllowInfNan(False)]
"""A float that must be finite: NaN, ``.inf`` and ``1e999`` are refused at validation."""
PositiveFiniteFloat = Annotated[float, AllowInfNan(False), Field(gt=0)]
"""A finite float > 0."""
NonNegativeFiniteFloat = Annotated[float, AllowInfNan(False), Field(ge=0)]
"""A finite float >= 0."""


class InputModel(BaseModel):
    """Base of the sweep and plan file models: frozen, unknown keys and NaN / infinity refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
