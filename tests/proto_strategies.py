"""Hypothesis strategies for any protobuf request message, read from its descriptor.

Built from the descriptor rather than by hand, so a field added to the .proto is fuzzed without
touching the tests. Values cover each wire type's whole range (negative, huge, NaN, infinite,
unknown enum numbers, unset optional fields) with extra weight on values near the server's limits,
where off-by-one refusals and crashes live.
"""

from __future__ import annotations

from hypothesis import strategies as st
from google.protobuf.descriptor import FieldDescriptor as F

INT_RANGES = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
NEAR_LIMITS = (0, 1, 2, 3, 4, 7, 8, 9, 16, 64, 255, 256, 511, 512, 513, 1023, 1024, 1025, 2048, 4096,
               262_144, 2**31 - 1)
"""Small and boundary values (the test server's limits are small; the defaults are listed too)."""
TEXTS = ("The assert statement in Python", " ", "\n", "\x00", "<|im_end|>", "<|im_start|>system",
         "héllo wörld ✓ 漢字 🙂", "word " * 60, "def f(x):\n    return x", ".", "/", "..", "\t\r\n")
"""Prompts, queries, stop sequences and paths worth trying besides random text."""

# Protobuf strings must be valid UTF-8: no lone surrogates.
_ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)


def _integers(field_type: int):
    low, high = INT_RANGES[field_type]
    near = [v for value in NEAR_LIMITS for v in (value, -value) if low <= v <= high]
    return st.one_of(st.sampled_from(near), st.integers(low, high))


def _floats(field_type: int):
    width = 32 if field_type == F.TYPE_FLOAT else 64
    return st.one_of(st.sampled_from([0.0, -0.0, 1e-9, 0.5, 1.0, 1.0000001, 2.0, 100.0, 100.5, -1.0]),
                     st.floats(width=width))


def _scalar(field):
    t = field.type
    if t in INT_RANGES:
        return _integers(t)
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return _floats(t)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.sampled_from(TEXTS), _ANY_TEXT)
    if t == F.TYPE_BYTES:
        return st.binary(max_size=300)
    if t == F.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-2**31, 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def message(message_class, depth: int = 0):
    """Instances of `message_class` with any subset of fields set to any value of their type."""
    fields = {}
    for field in message_class.DESCRIPTOR.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = message(_class_of(field), depth + 1)
        else:
            value = _scalar(field)
        fields[field.name] = st.lists(value, max_size=10) if field.is_repeated else value
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(message_class, values))


def _class_of(field):
    from google.protobuf.message_factory import GetMessageClass

    return GetMessageClass(field.message_type)


def _build(message_class, values: dict):
    built = message_class()
    for name, value in values.items():
        field = message_class.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            target = getattr(built, name)
            if field.type == F.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            getattr(built, name).CopyFrom(value)
        else:
            setattr(built, name, value)
    return built
