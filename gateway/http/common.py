"""Request-body reading and field checks shared by both API surfaces.

Every bad input becomes a BadRequest that names the field; nothing here returns a 500.
"""
from __future__ import annotations

import base64
import json
import logging
import math

from flask import current_app, request

from gateway.canonical import FLOAT_OPTIONS, INT_OPTIONS, Options
from gateway.durations import parse_keep_alive
from gateway.errors import BadRequest, GatewayError, TooLarge, contains_secret, model_not_found
from gateway.ops.client_deadlines import ClientTooSlow
from gateway.tool_calls import too_deep

_INT_LIMIT = 2 ** 63
# Deeper JSON than this is refused at the door: recursive code further on (schema
# conversion, re-encoding for the upstream) would otherwise fail with a 500.
MAX_DEPTH = 100
# Model names are kept in logs, metrics and the usage log: a client cannot make them big.
MAX_MODEL_NAME = 512


def read_json_body(allow_empty: bool = False) -> dict:
    """The request's JSON object. Content-Type is not checked (Ollama decodes any body);
    the size limit is enforced before the body is read whole."""
    limit = current_app.extensions["gateway"].settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"request body too large: {length} bytes, limit {limit}")
    try:
        data = request.stream.read(limit + 1)
    except ClientTooSlow as e:
        raise GatewayError(str(e), status=408)
    except GatewayError:
        raise
    except Exception as e:   # a malformed chunked body, a cut connection
        raise BadRequest(f"invalid request body: could not be read ({type(e).__name__})")
    if len(data) > limit:
        raise TooLarge(f"request body too large: over the limit of {limit} bytes")
    if not data.strip():
        if allow_empty:
            return {}
        raise BadRequest("missing request body")
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        raise BadRequest("invalid request body: not valid UTF-8")
    except RecursionError:
        raise BadRequest(f"invalid request body: nested deeper than {MAX_DEPTH} levels")
    except ValueError as e:
        raise BadRequest(f"invalid JSON in request body: {str(e)[:120]}")
    if not isinstance(body, dict):
        raise BadRequest("invalid request body: expected a JSON object")
    if data.count(b"{") + data.count(b"[") > MAX_DEPTH:   # else it cannot be that deep
        for key, value in body.items():
            if too_deep(value, MAX_DEPTH - 1):
                raise BadRequest(f'invalid value for field "{key}": nested deeper than {MAX_DEPTH} levels')
    return body


def _type_error(field: str, expected: str):
    return BadRequest(f'invalid value for field "{field}": expected {expected}')


def get_str(body: dict, field: str, required=False, default=None, allow_empty=True):
    v = body.get(field)
    if v is None:
        if required:
            raise BadRequest(f"{field} is required")
        return default
    if not isinstance(v, str):
        raise _type_error(field, "a string")
    if not v and not allow_empty:
        raise BadRequest(f"{field} is required")
    return v


def get_model(body: dict, legacy_name: bool = False) -> str:
    field = "model"
    v = body.get("model")
    if (v is None or v == "") and legacy_name:
        field, v = "name", body.get("name")
    if v is None or v == "":
        raise BadRequest("model is required")
    if not isinstance(v, str):
        raise _type_error(field, "a string")
    return check_model_name(v, field)


def check_model_name(name: str, field: str = "model") -> str:
    if len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME:
        raise BadRequest(f'invalid value for field "{field}": longer than {MAX_MODEL_NAME} bytes')
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:   # a JSON "\ud800" escape: no upstream or database takes it
        raise BadRequest(f'invalid value for field "{field}": not valid Unicode (a lone surrogate)') from None
    if contains_secret(name):
        # The same 404 as any unknown name, before anything records the name.
        raise model_not_found(name)
    return name


def get_bool(body: dict, field: str, default=None):
    v = body.get(field)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(field, "true or false")
    return v


def number(value, field: str, integer=False, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(field, "an integer" if integer else "a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _type_error(field, "a finite number")
    if integer:
        if isinstance(value, float):
            if value != int(value):
                raise _type_error(field, "an integer")
            value = int(value)
        if abs(value) >= _INT_LIMIT:
            raise BadRequest(f'invalid value for field "{field}": out of range')
    else:
        value = float(value)
    if minimum is not None and value < minimum:
        raise BadRequest(f'invalid value for field "{field}": must be at least {minimum}')
    if maximum is not None and value > maximum:
        raise BadRequest(f'invalid value for field "{field}": must be at most {maximum}')
    return value


def get_number(body, field, integer=False, minimum=None, maximum=None):
    v = body.get(field)
    return None if v is None else number(v, field, integer, minimum, maximum)


def stop_list(value, field="stop") -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise _type_error(field, "a string or a list of strings")


def parse_options(raw) -> Options:
    """Ollama `options`. Unknown keys are ignored, as Ollama does; known keys of the wrong
    type are a 400 naming the option."""
    opts = Options()
    if raw is None:
        return opts
    if not isinstance(raw, dict):
        raise _type_error("options", "an object")
    for key in FLOAT_OPTIONS:
        if raw.get(key) is not None:
            setattr(opts, key, number(raw[key], f"options.{key}"))
    for key in INT_OPTIONS:
        if raw.get(key) is not None:
            setattr(opts, key, number(raw[key], f"options.{key}", integer=True))
    if opts.num_ctx is not None and opts.num_ctx <= 0:
        opts.num_ctx = None
    opts.stop = stop_list(raw.get("stop"), "options.stop")
    return opts


def parse_keep_alive_field(body: dict):
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except ValueError as e:
        raise BadRequest(f'invalid value for field "keep_alive": {e}')


def parse_format(value):
    if value is None or value == "":
        return None
    if value == "json" or isinstance(value, dict):
        return value
    raise _type_error("format", '"json" or a JSON schema object')


def parse_think(value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("low", "medium", "high", "max"):
        return value
    raise _type_error("think", 'true, false, "low", "medium", "high" or "max"')


def strip_data_url(image, field: str) -> str:
    if not isinstance(image, str):
        raise _type_error(field, "a base64 string")
    if image.startswith("data:"):
        comma = image.find(",")
        if comma < 0:
            raise BadRequest(f'invalid value for field "{field}": malformed data URL')
        image = image[comma + 1:]
    try:
        base64.b64decode(image, validate=True)
    except (ValueError, TypeError):
        raise BadRequest(f'invalid value for field "{field}": not valid base64')
    return image


def parse_tools(value, field="tools") -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _type_error(field, "a list of tools")
    out = []
    for i, t in enumerate(value):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f'invalid value for field "{field}[{i}]": expected '
                             '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _type_error(f"{field}[{i}].function.parameters", "an object")
        out.append({"type": "function", "function": {
            "name": fn["name"], "description": str(fn.get("description") or ""),
            "parameters": params or {"type": "object", "properties": {}}}})
    return out


IMAGE_TOKENS = 1600    # Anthropic's cap for one image at its default size


def estimate_tokens(req) -> int:
    """For providers that cannot count: ~4 UTF-8 bytes per token over every text, tool
    definition and tool call, plus a few tokens of framing per message."""
    size, images = 0, 0
    for m in req.messages:
        size += len(m.content.encode()) + len((m.thinking or "").encode()) + 16
        for tc in m.tool_calls:
            size += len(tc.name) + len(json.dumps(tc.arguments, ensure_ascii=False, separators=(",", ":")))
        images += len(m.images)
    if req.tools:
        size += len(json.dumps(req.tools, ensure_ascii=False, separators=(",", ":")))
    return int(math.ceil(size / 4)) + images * IMAGE_TOKENS


def count_input_tokens(st, req) -> int:
    """The prompt's tokens for the count endpoints (Anthropic's count_tokens, the Responses
    input_tokens): the provider's own count where it has one (local tokenizer, Gemini,
    Anthropic), else estimate_tokens. A count that fails upstream is estimated too:
    agents budget their context by this answer."""
    target = st.router.resolve(req.model)[0]
    try:
        n = target.provider.count_tokens(req, target.upstream_id)
    except GatewayError as e:
        logging.getLogger("gateway.count").warning(
            "counting tokens on %s failed (%s); answering an estimate", target.card.name, e.message)
        n = None
    return int(n) if n is not None else estimate_tokens(req)
