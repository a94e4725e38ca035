"""A text column that stores any Python string exactly, on SQLite and PostgreSQL alike.

PostgreSQL's text type refuses the NUL character (\\x00), which a model may well generate. A value
that contains one (or that starts with MARKER, so that decoding is never ambiguous) is stored as
MARKER followed by its JSON string form (ASCII: NUL and every other control character escaped); any
other value is stored as it is, so ordinary outputs stay readable and searchable in SQL and rows
written before this encoding existed read back unchanged. Reads through SQLAlchemy (ORM or Core,
any select naming the column) decode; raw SQL sees the encoded form.

It knows nothing of what the text means: outputs and errors of requests and annotations use it.
"""

from __future__ import annotations

import json

from sqlalchemy import Text
from sqlalchemy.types import TypeDecorator

MARKER = "\ufdd0"
"""A Unicode noncharacter: never produced by a tokenizer's decode of real text."""


def encode(value: str | None) -> str | None:
    if value is None or ("\x00" not in value and not value.startswith(MARKER)):
        return value
    return MARKER + json.dumps(value)


def decode(value: str | None) -> str | None:
    if value is None or not value.startswith(MARKER):
        return value
    return json.loads(value[len(MARKER):])


class ExactText(TypeDecorator):
    """Text, with NUL characters stored reversibly (see the module's docstring)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy's signature
        return encode(value)

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201
        return decode(value)
