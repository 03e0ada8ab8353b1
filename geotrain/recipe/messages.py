"""Where a recipe went wrong, in one line: the YAML line of the field a validation error
is about, and a message that says what was wrong and what would be valid (with a
"did you mean" for a misspelt key or choice). geotrain/recipe/__init__.py `loads()`
uses it; nothing here knows a field by name.
"""

from __future__ import annotations

import difflib
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from geotrain.errors import RecipeError
from geotrain.recipe.sections import GPU_REQ
from providers.options import PATTERN_HINTS

def _check_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    # PyYAML silently keeps the last of two equal keys; a recipe should never rely on that.
    stack, seen = [root] if root is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or isinstance(node, yaml.ScalarNode):
            continue
        seen.add(id(node))
        is_map = isinstance(node, yaml.MappingNode)
        pairs = node.value if is_map else [(None, n) for n in node.value]
        lines: dict[str, int] = {}
        for key, value in pairs:
            if isinstance(key, yaml.ScalarNode) and key.value in lines:
                raise RecipeError(source, key.start_mark.line + 1, "", f"duplicate key "
                                  f"'{key.value}' (first on line {lines[key.value]})")
            if isinstance(key, yaml.ScalarNode):
                lines[key.value] = key.start_mark.line + 1
            stack.append(value)


def _first_error(exc: ValidationError, root: yaml.Node, source: str) -> RecipeError:
    """The one error to report: the topmost in the file, preferring anything over 'missing'
    (a misspelt required key is both unknown and missing; 'did you mean' helps more)."""
    found = []
    for err in exc.errors():
        loc = tuple(err["loc"]) + tuple(err.get("ctx", {}).get("at", ()))
        found.append((err["type"] == "missing", _line_of(root, loc), len(found), loc, err))
    _, line, _, loc, err = min(found)
    shown = loc[:-1] if err["type"] == "invalid_key" else loc  # a non-text key is no field
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in shown).lstrip(".")
    return RecipeError(source, line, field, _message(err, loc))


def _line_of(root: yaml.Node, loc: tuple) -> int:
    """The line of the deepest node along loc: the key itself, or its parent if it is missing."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            line, node = match[-1][0].start_mark.line + 1, match[-1][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _type_at(loc: tuple) -> Any:
    """The annotation of the field at loc, walking Recipe's models and lists."""
    from geotrain.recipe import Recipe

    t: Any = Recipe
    for part in loc:
        t = _unwrap_optional(t)
        if isinstance(part, int):
            t = (get_args(t) or (None,))[0]
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return None
    return _unwrap_optional(t)


def _unwrap_optional(t: Any) -> Any:
    """`Model | None` -> Model; anything else as it is."""
    args = get_args(t)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return t


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, short."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _did_you_mean(word: Any, options: list | tuple) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"did you mean '{close[0]}'?" if close else ""


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping",
    "dict_type": "a mapping",
}


def _message(err: dict, loc: tuple) -> str:
    """One crisp sentence for a pydantic error: what was wrong and what would be valid."""
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind in ("extra_forbidden", "invalid_key"):
        valid = list(_type_at(loc[:-1]).model_fields)
        hint = _did_you_mean(loc[-1], valid)
        hint += " " if hint else ""
        return f"unknown field '{loc[-1]}'; {hint}valid fields: {', '.join(valid)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        options = get_args(_type_at(loc))
        hint = _did_you_mean(got, options)
        return (f"expected one of {', '.join(map(repr, options))} "
                f"(got {_show(got)}{'; ' + hint if hint else ''})")
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {_show(ctx[key])} (got {_show(got)})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]} (got {_show(got)})"
    if kind in ("too_short", "too_long"):
        n = ctx["min_length" if kind == "too_short" else "max_length"]
        least = "at least" if kind == "too_short" else "at most"
        return f"must have {least} {n} item{'s' * (n != 1)} (got {ctx['actual_length']})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters (got {len(got)})"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == GPU_REQ:
        return f"expected 'MODEL:COUNT' GPUs per node, e.g. 'A100:8' or 'L4:1' (got {_show(got)})"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HINTS:
        return f"{PATTERN_HINTS[ctx['pattern']]} (got {_show(got)})"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "entrypoint":
        return f"must be 'module:function', e.g. 'mypkg.train:main' (got {_show(got)})"
    if kind == "string_pattern_mismatch":
        return f"must be lowercase a-z, 0-9 and '-', not starting with '-' (got {_show(got)})"
    return err["msg"]  # our own PydanticCustomErrors, already phrased for users
