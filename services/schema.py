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
    return _check(_validator(name), name, document)


def validate_against(schema: dict[str, Any], label: str, document: Any) -> Any:
    """Like :func:`validate` for a schema that lives in code (a processor's
    settings schema); ``label`` names the document in the message."""
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


def load_json(name: str, text: str) -> Any:
    """Decode JSON text meant to be a ``name`` document (validated by the
    consumer); a decode failure raises SchemaError like a validation failure."""
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"invalid {name}: not JSON: {exc}") from exc


def parse(name: str, text: str) -> Any:
    """Decode JSON text and validate it; both failures raise SchemaError."""
    return validate(name, load_json(name, text))
