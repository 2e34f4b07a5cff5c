"""The base of every config section, and validation of one section from plain data into a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from o2mkd_ray.config.messages import config_error

# strict: `true` is not an integer and "3" is not a number (an integer is still a float); unknown keys are errors
STRICT = ConfigDict(strict=True, extra="forbid")


class Section(BaseModel):
    """A config section: typed fields with defaults, checked on construction, assignable afterwards.

    Construction errors are :class:`~o2mkd_ray.errors.ConfigError` lines, never pydantic's text. Assigning an
    attribute later is not checked (code that adjusts a loaded config, e.g. ``cfg.eval.enabled = False``).
    """

    model_config = STRICT
    # the section's key in the config tree, for the errors of a section built in code (``TrainConfig(steps=0)``)
    section_key: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, type(self), data, self.section_key) from None

    # Pydantic calls a model's own __init__ to build it as a nested field unless the __init__ carries the marker
    # BaseModel's and RootModel's carry; this one only translates errors, so nested sections are validated in place
    # and errors keep their full key (`train.steps`, not `steps`).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @model_validator(mode="before")
    @classmethod
    def _absent_means_defaults(cls, data: Any) -> Any:
        # a YAML section written with no body (`train:`) is null: it means "all defaults", as it always has
        return {} if data is None else data

    def to_dict(self) -> dict:
        """Returns a plain, JSON-safe copy (nested sections as dicts, same keys and order as the fields)."""
        # values assigned after construction are not checked, so they are dumped as they are, without warnings
        return self.model_dump(warnings=False)

    def to_json(self) -> str:
        """Returns :meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def validate_as(cls: type, data: Any, prefix: str = "", context: dict | None = None) -> Any:
    """Builds ``cls`` from plain data, or raises a one-line ConfigError naming the key.

    Args:
        cls: a :class:`Section` (or any pydantic model), or a plain dataclass whose fields are config types.
        data: a mapping (None means all defaults).
        prefix: the dotted key of ``cls`` in the config tree, for messages ("" for the root).
        context: pydantic validation context for the model's validators.
    Returns:
        An instance of ``cls``.
    """
    model = cls if issubclass(cls, BaseModel) else _dataclass_model(cls)
    data = {} if data is None else data
    try:
        built = model.model_validate(data, context=context)
    except ValidationError as e:
        raise config_error(e, cls, data, prefix) from None
    return built if model is cls else cls(**{name: getattr(built, name) for name in model.model_fields})


@functools.cache
def _dataclass_model(cls: type) -> type[BaseModel]:
    """A strict pydantic model with the fields, types and defaults of a plain dataclass (validated, then copied)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], f.default if f.default is not dataclasses.MISSING else ...)
    return create_model(cls.__name__, __config__=STRICT, **fields)
