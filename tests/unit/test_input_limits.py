"""Hostile arguments: too long, too deep. Refused with a short message, never
echoed whole, never a RecursionError (services/schema.py, services/component.py)."""

from __future__ import annotations

import logging

import pytest

from services.component import BRIEF_CHARS, Counters, brief
from services.scan import ScanError, parse_scan
from services.schema import DEFAULT_TEXT_LIMIT, MAX_DEPTH, SchemaError, check_depth, load_json, validate_against

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_SHORT = "[" * 30_000 + "]" * 30_000  # within the length limit: the depth is what is refused


def test_a_too_long_argument_is_refused_without_echoing_it():
    with pytest.raises(SchemaError) as err:
        load_json("lookup", "x" * (DEFAULT_TEXT_LIMIT + 1))
    assert "exceed the limit" in str(err.value) and len(str(err.value)) < 200


def test_a_scan_document_may_be_megabytes_but_not_ten():
    with pytest.raises(ScanError, match="exceed the limit") as err:
        parse_scan("{" + " " * (10 * 2**20) + "}")
    assert len(str(err.value)) < 1024


def test_json_nested_100000_deep_is_the_invalid_input_error():
    with pytest.raises(SchemaError, match="nested deeper"):
        load_json("registration", DEEP_SHORT)
    with pytest.raises(SchemaError, match="exceed the limit"):
        load_json("registration", DEEP)
    with pytest.raises(ScanError, match="nested deeper"):
        parse_scan(DEEP)


def test_decoded_documents_are_depth_checked_too():
    deep: dict = {}
    node = deep
    for _ in range(MAX_DEPTH + 1):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(SchemaError, match="nested deeper"):
        validate_against({"type": "object"}, "settings", deep)
    check_depth("ok", {"a": [[1, 2], {"b": 3}]})  # shallow documents pass
    with pytest.raises(SchemaError):
        check_depth("list", [[[[1]]]], limit=3)
    check_depth("list", [[[1]]], limit=3)


def test_bad_json_quotes_the_decoder_briefly():
    with pytest.raises(SchemaError, match="not JSON") as err:
        load_json("lookup", "{" + "x" * 10_000)
    assert len(str(err.value)) < 1024


def test_brief_cuts_and_says_how_long_it_was():
    assert brief("short") == "short"
    cut = brief("y" * 10 * 2**20)
    assert cut.startswith("y" * BRIEF_CHARS) and cut.endswith(f"({10 * 2**20} characters)") and len(cut) < 400


def test_an_error_counter_keeps_the_last_error_small(caplog):
    counters = Counters(logging.getLogger("test"))
    with caplog.at_level(logging.ERROR):
        counters.error("refused " + "z" * 10 * 2**20)
    assert counters.errors == 1 and len(counters.last_error) < 1500
    assert all(len(r.getMessage()) < 1500 for r in caplog.records)
