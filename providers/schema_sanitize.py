"""JSON Schema -> the OpenAPI-3 subset Gemini accepts for responseSchema and
functionDeclarations[].parameters.

Gemini answers 400 "Unknown name" / "Invalid JSON payload" for keywords outside its subset
($schema, additionalProperties, title, default, examples, $ref...), and rejects enums on
non-strings and most string formats. Clients (Open WebUI tools, pydantic-generated schemas,
MCP servers) send all of these, so we rewrite rather than pass through.
"""
from __future__ import annotations

from typing import Optional

_MAX_DEPTH = 32
_FORMATS = {"STRING": {"enum", "date-time"}, "INTEGER": {"int32", "int64"},
            "NUMBER": {"float", "double"}}
_TYPES = {"string", "number", "integer", "boolean", "array", "object"}


def sanitize_schema(schema, root: Optional[dict] = None) -> dict:
    """A copy of `schema` that Gemini accepts. Never raises on odd input: what cannot be
    expressed is widened (an unresolvable $ref becomes a bare OBJECT)."""
    if not isinstance(schema, dict):
        return {"type": "STRING"}
    return _clean(schema, schema if root is None else root, 0, ())


def _resolve(ref: str, root: dict):
    # Only local refs ("#/$defs/X", "#/definitions/X", "#/properties/a/..."): remote
    # refs cannot be fetched from here.
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def _clean(s: dict, root: dict, depth: int, seen: tuple) -> dict:
    if depth > _MAX_DEPTH:
        return {"type": "OBJECT"}
    if "$ref" in s:
        ref = s["$ref"]
        target = _resolve(ref, root)
        if target is None or ref in seen:      # a recursive type cannot be inlined
            stub = {"type": "OBJECT"}
            if isinstance(s.get("description"), str):
                stub["description"] = s["description"]
            return stub
        merged = dict(target)
        merged.update({k: v for k, v in s.items() if k != "$ref"})
        return _clean(merged, root, depth + 1, seen + (ref,))

    if isinstance(s.get("allOf"), list):
        return _clean(_merge_all_of(s, root), root, depth + 1, seen)

    out: dict = {}
    nullable = bool(s.get("nullable"))
    types = s.get("type")
    if isinstance(types, list):
        real = [t for t in types if t != "null"]
        nullable = nullable or len(real) < len(types)
        if len(real) > 1:
            # ["string","integer"] has no single OpenAPI type: express it as anyOf.
            variants = [_clean({**s, "type": t}, root, depth + 1, seen) for t in real]
            for v in variants:
                v.pop("nullable", None)
            out = {"anyOf": variants}
            if nullable:
                out["nullable"] = True
            return out
        types = real[0] if real else None
    elif types == "null":
        types, nullable = None, True

    variants = s.get("anyOf") if isinstance(s.get("anyOf"), list) else s.get("oneOf")
    if isinstance(variants, list) and types is None:
        kept = []
        for v in variants:
            if isinstance(v, dict) and v.get("type") == "null":
                nullable = True
                continue
            kept.append(_clean(v if isinstance(v, dict) else {}, root, depth + 1, seen))
        if len(kept) == 1:
            # Optional[X] from pydantic is anyOf[X, null]: a plain nullable X is friendlier.
            out = kept[0]
            if isinstance(s.get("description"), str) and "description" not in out:
                out["description"] = s["description"]
        elif kept:
            out["anyOf"] = kept
            if isinstance(s.get("description"), str):
                out["description"] = s["description"]
        if nullable:
            out["nullable"] = True
        return out or {"type": "STRING", "nullable": True}

    enum = s.get("enum")
    if "const" in s and enum is None:
        enum = [s["const"]]
    if types is None:
        if isinstance(s.get("properties"), dict):
            types = "object"
        elif "items" in s:
            types = "array"
        elif isinstance(enum, list):
            types = "string"
    if isinstance(enum, list):
        if any(v is None for v in enum):
            nullable = True
        vals = [v for v in enum if v is not None]
        if vals:
            # Gemini enums are strings only; a stringified enum still constrains the value.
            out["enum"] = [v if isinstance(v, str) else _enum_text(v) for v in vals]
            types = "string"

    if isinstance(types, str) and types.lower() in _TYPES:
        out["type"] = types.upper()
    elif types is not None or not out:
        out["type"] = "STRING"
    t = out.get("type")

    fmt = s.get("format")
    if "format" not in out and isinstance(fmt, str) and fmt in _FORMATS.get(t or "", ()):
        out["format"] = fmt
    if isinstance(s.get("description"), str):
        out["description"] = s["description"]
    if nullable:
        out["nullable"] = True

    if t == "OBJECT" and isinstance(s.get("properties"), dict):
        props = {str(k): _clean(v if isinstance(v, dict) else {}, root, depth + 1, seen)
                 for k, v in s["properties"].items()}
        if props:
            out["properties"] = props
            req = [r for r in (s.get("required") or []) if isinstance(r, str) and r in props]
            if req:
                out["required"] = req
            order = s.get("propertyOrdering")
            if isinstance(order, list):
                out["propertyOrdering"] = [p for p in order if p in props]
    if t == "ARRAY":
        items = s.get("items")
        if isinstance(items, list):          # tuple form: the first item is the best guess
            items = items[0] if items else {}
        out["items"] = _clean(items if isinstance(items, dict) else {}, root, depth + 1, seen)
        for k in ("minItems", "maxItems"):
            if isinstance(s.get(k), int) and not isinstance(s.get(k), bool):
                out[k] = s[k]
    return out


def _enum_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _merge_all_of(s: dict, root: dict) -> dict:
    merged = {k: v for k, v in s.items() if k != "allOf"}
    props = dict(merged.get("properties") or {})
    req = list(merged.get("required") or [])
    for part in s["allOf"]:
        if isinstance(part, dict) and "$ref" in part:
            target = _resolve(part["$ref"], root)
            # An unresolvable ref is kept so that _clean widens it to a bare OBJECT.
            part = {**target, **{k: v for k, v in part.items() if k != "$ref"}} \
                if target is not None else part
        if not isinstance(part, dict):
            continue
        for k, v in part.items():
            if k == "properties" and isinstance(v, dict):
                props.update(v)
            elif k == "required" and isinstance(v, list):
                req += [r for r in v if r not in req]
            else:
                merged.setdefault(k, v)
    if props:
        merged["properties"] = props
    if req:
        merged["required"] = req
    return merged
