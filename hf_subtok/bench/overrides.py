"""`key=value` overrides of a dataclass's fields, parsed with each field's declared type.

Used by `--methods subtok:axes=tokens+token_scorer=key_norm@0.25`: the names come from
`dataclasses.fields(cls)` and the types from its annotations, so fields added to
`SubTokenConfig` later are accepted without touching this file.

Value syntax by type: `int`, `float`, `str` as written; `bool` as true/false/yes/no/1/0;
`X | None` also accepts `none`; a tuple or list as `[a,b,c]` or `a/b/c`; anything else as a
Python literal (`ast.literal_eval`). A bad name or value raises `ValueError` naming it.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def field_types(cls) -> dict[str, object]:
    """`{name: type}` of every init field of dataclass `cls`, annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, object) for f in dataclasses.fields(cls) if f.init}


def parse_overrides(text: str, cls, *, what: str) -> tuple[tuple[str, object], ...]:
    """`"axes=tokens+window=32"` -> `(("axes", "tokens"), ("window", 32))`, typed per field.

    Args:
        text: `key=value` pairs joined by `+`.
        cls: the dataclass whose fields may be set.
        what: how errors name the fields, e.g. "subtok field".

    Raises:
        ValueError: an item is not `key=value`, names no field of `cls`, repeats a field,
            or its value does not parse as the field's type.
    """
    types_by_name = field_types(cls)
    pairs: dict[str, object] = {}
    for item in split_top_level(text, "+"):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{what} override must be key=value, got {item!r}")
        if name not in types_by_name:
            raise ValueError(f"{what} must be one of {', '.join(types_by_name)}, got {name!r}")
        if name in pairs:
            raise ValueError(f"{what} {name} is set twice, got {item!r}")
        pairs[name] = convert(name, raw.strip(), types_by_name[name], what=what)
    return tuple(pairs.items())


def format_overrides(pairs) -> str:
    """`(("axes", "tokens"), ("window", 32))` -> `"axes=tokens+window=32"`."""
    return "+".join(f"{k}={_format_value(v)}" for k, v in pairs)


def convert(name: str, text: str, tp, *, what: str = "field"):
    """`text` as a value of type `tp` (see the module docstring); `ValueError` naming `name`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(name, text, option, what=what)
            except ValueError:
                continue
        raise ValueError(f"{what} {name} must be {_describe(tp)}, got {text!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice).lower() == text.lower():
                return choice
        raise ValueError(f"{what} {name} must be one of {', '.join(map(str, args))}, got {text!r}")
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{what} {name} must be true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{what} {name} must be {tp.__name__}, got {text!r}") from None
    if tp is str:
        if not text:
            raise ValueError(f"{what} {name} must be a non-empty string, got {text!r}")
        return text
    if origin in (tuple, list) or tp in (tuple, list):
        container = origin or tp
        inner = [a for a in args if a is not Ellipsis]
        items = _sequence_items(text)
        if not inner:
            return container(_literal(name, item, what) for item in items)
        fixed = container is tuple and Ellipsis not in args
        if fixed and len(inner) != len(items):
            raise ValueError(f"{what} {name} must have {len(inner)} items, got {text!r}")
        kinds = inner if fixed else [inner[0]] * len(items)
        return container(convert(name, item, kind, what=what) for item, kind in zip(items, kinds, strict=True))
    return _literal(name, text, what)


def split_top_level(text: str, sep: str) -> list[str]:
    """Split `text` on `sep` outside brackets and braces: `"a=[1,2],b"` -> `["a=[1,2]", "b"]`."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _sequence_items(text: str) -> list[str]:
    body = text.strip()
    if body[:1] in "[(" and body[-1:] in "])":
        return split_top_level(body[1:-1], ",")
    return [p.strip() for p in body.split("/") if p.strip()]


def _literal(name: str, text: str, what: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{what} {name} must be a Python literal, got {text!r}") from None


def _describe(tp) -> str:
    return " or ".join("none" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def _format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)
