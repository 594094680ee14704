"""The wire protocol's checks of what one stage may send another (services/protocol.py)."""

from __future__ import annotations

import json

import msgpack
import pytest

from services import codec, protocol


def test_kinds_travel_as_plain_words():
    assert json.dumps({"kind": protocol.Kind.MASTER}) == '{"kind": "master"}'
    assert msgpack.unpackb(msgpack.packb(protocol.Kind.SORTER)) == "sorter"
    assert set(protocol.CONSUMER_KINDS) == {"sink", "writer", "recorder"}


def test_a_credit_names_its_worker_and_asks_for_a_bounded_number_of_units():
    assert protocol.check_credit(protocol.credit(3, "w1", "debug")) == ("w1", "debug", 3, None)
    assert protocol.check_credit(protocol.credit(0, "w1", open_units=2)) == ("w1", "", 0, 2)
    with pytest.raises(ValueError, match="worker name"):
        protocol.check_credit(codec.Message(codec.CREDIT, count=1, meta={"worker": 7}))
    with pytest.raises(ValueError, match="0..10000"):
        protocol.check_credit(protocol.credit(protocol.MAX_CREDIT + 1, "w1"))
    with pytest.raises(ValueError, match="0..10000"):
        protocol.check_credit(protocol.credit(1, "w1", open_units=-1))
    with pytest.raises(ValueError, match="refused ack"):
        protocol.check_credit(protocol.ack("s1", [(0, 1)]))


@pytest.mark.parametrize("meta, why", [
    ({protocol.META_ERRORS: {"3": 4}}, "errors"),
    ({protocol.META_ERRORS: [["3", "bad"]]}, "errors"),
    ({protocol.META_INCOMPLETE: {"scaler": [[0]]}}, "incomplete"),
    ({protocol.META_INCOMPLETE: {"scaler": [[0, 1.5]]}}, "incomplete"),
])
def test_result_meta_out_of_shape_is_refused(meta, why):
    with pytest.raises(ValueError, match=why):
        protocol.check_result_meta(meta)


def test_result_meta_in_shape_passes():
    protocol.check_result_meta({protocol.META_ERRORS: {"3": "ValueError: no beam"},
                                protocol.META_INCOMPLETE: {"scaler": [[0, 10]]}})


def test_ack_ranges_are_checked():
    assert protocol.ack_ranges(protocol.ack("s1", [(0, 5), (9, 10)])) == [(0, 5), (9, 10)]
    with pytest.raises(ValueError, match="bad ack range"):
        protocol.ack_ranges(protocol.ack("s1", [(5, 5)]))


def test_resume_meta_is_checked() -> None:
    assert protocol.check_resume({}) is None
    assert protocol.check_resume({protocol.META_RESUME: 0, protocol.META_ACKED: []}) == 0
    assert protocol.check_resume({protocol.META_RESUME: 300, protocol.META_ACKED: [[100, 300], [0, 100]]}) == 300
    assert protocol.check_resume({protocol.META_RESUME: 300}) == 300  # as forwarded to consumers
    for bad, why in (({protocol.META_RESUME: "3"}, "must be an index"), ({protocol.META_RESUME: -1}, "index"),
                     ({protocol.META_RESUME: 5, protocol.META_ACKED: [[0]]}, "acked"),
                     ({protocol.META_RESUME: 5, protocol.META_ACKED: [[0, 2], [3, 5]]}, "beyond"),
                     ({protocol.META_RESUME: 5, protocol.META_ACKED: [[1, 9]]}, "beyond")):
        with pytest.raises(ValueError, match=why):
            protocol.check_resume(bad)
    assert protocol.acked_prefix([(100, 200), (0, 100), (300, 400)]) == 200 and protocol.acked_prefix([(5, 9)]) == 0
    assert protocol.check_sorter({}) is None and protocol.check_sorter({"sorter": "tcp://h:1"}) == "tcp://h:1"
    with pytest.raises(ValueError, match="endpoint"):
        protocol.check_sorter({"sorter": 5})
