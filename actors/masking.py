"""Masking: fields a schema marks sensitive never reach a log line or an error message.

A field is sensitive when its type is annotated `msgspec.Meta(extra={"sensitive": True})`
(e.g. an account owner's name). The mark lives in the schema, so it is also in the JSON
Schema other teams read; this module reads it back with `msgspec.inspect`, once per type.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

MASK = "***"


@cache
def sensitive_fields(struct_type: type) -> frozenset[str]:
    """The top-level fields of `struct_type` marked sensitive. ValueError if one is not a
    string: a sensitive field is sealed at rest (actors/sealing.py), as a string."""
    info = msgspec.inspect.type_info(struct_type)
    if not isinstance(info, msgspec.inspect.StructType):
        return frozenset()
    found = set()
    for field in info.fields:
        meta = field.type
        if isinstance(meta, msgspec.inspect.Metadata) and (meta.extra or {}).get("sensitive"):
            if not isinstance(meta.type, msgspec.inspect.StrType):
                raise ValueError(
                    f"{struct_type.__name__}.{field.name} is marked sensitive but is not a"
                    " string: only strings can be sealed at rest"
                )
            found.add(field.encode_name)
    return frozenset(found)


def masked(value: Any) -> Any:
    """A JSON-ready copy of a Struct (or anything) with its sensitive fields masked."""
    if not isinstance(value, msgspec.Struct):
        return value
    hidden = sensitive_fields(type(value))
    data = msgspec.to_builtins(value)
    if isinstance(data, dict):
        for name in hidden & data.keys():
            data[name] = MASK
        data.setdefault("type", type(value).__name__)
    return data
