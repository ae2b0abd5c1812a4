"""The base of every config section (run-level, a method's, a library's).

Every section is a pydantic model with ``extra="forbid"``: a typo in a key is an error that names the
key (with a did-you-mean, see :mod:`kdistill.config`), never silently ignored. Numbers must be finite
(``.inf`` and ``.nan`` are refused) and a YAML boolean is never taken for an integer.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, field_validator


def _takes_int(annotation) -> bool:
    """``int``, ``Optional[int]``, ``Union[Literal[...], int]``: a field where YAML's ``true`` must not pass as 1."""
    if annotation is int:
        return True
    return any(_takes_int(a) for a in get_args(annotation)) and bool not in get_args(annotation)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, numbers must be finite (``.inf`` and
    ``.nan`` are refused) and a boolean is never taken for an integer (``max_steps: true``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_int(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and _takes_int(field.annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


#: for a section with a key that is a Python keyword (``lambda``, ``from``): the field is named
#: ``lambda_`` / ``from_`` with the keyword as its alias; YAML and dumps use the keyword.
ALIASED = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, validate_by_name=True,
                     validate_by_alias=True, serialize_by_alias=True)
