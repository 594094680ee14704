"""The one place where JSON documents crossing a service boundary are validated.

Schemas live as JSON files beside this module (``schemas/<name>.json``) so that
they can be read by people and by other tools as well.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema

from services.component import brief


#: Largest JSON text accepted per document name: a scan document with a long
#: point list is megabytes; every other argument is small.
TEXT_LIMITS = {"scan": 8 * 2**20}
DEFAULT_TEXT_LIMIT = 64 * 2**10
#: Deepest nesting of maps and lists accepted in any document.
MAX_DEPTH = 64


class SchemaError(ValueError):
    """A document that does not match its schema; the message says where and why."""


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.protocols.Validator:
    text = resources.files(__package__).joinpath("schemas", f"{name}.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def preload(*names: str) -> None:
    """Compile schemas now, at service start, rather than on the first
    document (the scan schema takes ~60 ms: a latency spike on the first scan)."""
    for name in names:
        _validator(name)


def validate(name: str, document: Any) -> Any:
    """Raise SchemaError naming the first offending path; return the document."""
    check_depth(name, document)
    return _check(_validator(name), name, document)


def validate_against(schema: dict[str, Any], label: str, document: Any) -> Any:
    """Like :func:`validate` for a schema that lives in code (a processor's
    settings schema); ``label`` names the document in the message."""
    check_depth(label, document)
    return _check(_validator_for(json.dumps(schema, sort_keys=True)), label, document)


@lru_cache(maxsize=256)
def _validator_for(schema_text: str) -> jsonschema.protocols.Validator:
    """Checked and compiled once per distinct schema (a worker starts a processor per scan)."""
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _check(validator: jsonschema.protocols.Validator, label: str, document: Any) -> Any:
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise SchemaError(f"invalid {label}: at {where}: {error.message}")
    return document


def check_depth(name: str, document: Any, limit: int = MAX_DEPTH) -> None:
    """SchemaError if maps and lists nest deeper than ``limit``: validators and
    consumers recurse, and a hostile document must not reach them."""
    level = [document]
    for depth in range(limit + 1):
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    raise SchemaError(f"invalid {name}: nested deeper than {limit} levels")


def load_json(name: str, text: str | bytes) -> Any:
    """Decode JSON text meant to be a ``name`` document (validated by the
    consumer); too long a text, a decode failure or too deep a nesting raise
    SchemaError like a validation failure, and the message never quotes the
    text at length."""
    limit = TEXT_LIMITS.get(name, DEFAULT_TEXT_LIMIT)
    if isinstance(text, (str, bytes, bytearray)) and len(text) > limit:
        raise SchemaError(f"invalid {name}: {len(text)} characters exceed the limit of {limit}")
    try:
        document = json.loads(text)
    except RecursionError:
        raise SchemaError(f"invalid {name}: nested deeper than {MAX_DEPTH} levels") from None
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"invalid {name}: not JSON: {brief(str(exc))}") from None
    check_depth(name, document)
    return document


def parse(name: str, text: str) -> Any:
    """Decode JSON text and validate it; both failures raise SchemaError."""
    return validate(name, load_json(name, text))
