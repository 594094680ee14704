"""Unit tests of the data-plane wire codec (services/codec.py).

Round trips (property based, directly, through ``zmq.Frame`` objects and through
real sockets), zero-copy over TCP, what encode refuses, targeted decode
rejections and a seeded 100,000-case fuzz of decode.
"""

from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from services import codec
from services.codec import (
    ACK,
    BLOCK_TYPES,
    CREDIT,
    DATA,
    GAP,
    MAX_ARRAYS,
    MAX_COUNT,
    MAX_HEADER_BYTES,
    MAX_INDEX,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MESSAGE_TYPES,
    RESULT,
    SCAN_ABORT,
    SCAN_END,
    SCAN_START,
    WIRE_VERSION,
    CodecError,
    Message,
    decode,
    encode,
)

RECV_TIMEOUT_MS = 10_000


# --------------------------------------------------------------------------- helpers


def _same(a, b) -> bool:
    """Deep equality that also insists on equal types (bool is not int, bytes
    is not str) and treats NaN as equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _assert_array_equal(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert isinstance(got, np.ndarray), name
    assert got.dtype == want.dtype and got.dtype.str == want.dtype.str, (name, got.dtype.str, want.dtype.str)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.dtype.kind in "fc":
        assert np.array_equal(got, want, equal_nan=True), name
    else:
        assert np.array_equal(got, want), name
    # bit-exact, NaN payloads and signed zeros included
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


def _assert_same_message(got: Message, want: Message) -> None:
    assert isinstance(got, Message)
    assert got.type == want.type
    assert got.scan == want.scan
    assert got.stream == want.stream
    assert type(got.index) is int and got.index == want.index
    assert type(got.count) is int and got.count == want.count
    assert list(got.arrays) == list(want.arrays)
    for name, want_arr in want.arrays.items():
        _assert_array_equal(got.arrays[name], np.asarray(want_arr), name)
    assert _same(got.meta, want.meta), (got.meta, want.meta)
    assert got.stop == want.index + want.count
    assert got.nbytes == sum(np.asarray(a).nbytes for a in want.arrays.values())


def _header(**overrides) -> dict:
    header = {
        "v": WIRE_VERSION,
        "t": ACK,
        "scan": "scan-1",
        "stream": "xspress3",
        "index": 0,
        "count": 0,
        "arrays": [],
        "meta": {},
    }
    header.update(overrides)
    return header


def _pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _base_chain(arr: np.ndarray) -> list:
    chain = []
    obj = arr
    while obj is not None and len(chain) < 16:
        chain.append(obj)
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            break
    return chain


def _address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def _frame_address(frame: zmq.Frame) -> int:
    return _address(np.frombuffer(frame.buffer, dtype=np.uint8))


# --------------------------------------------------------------------------- strategies

_dtypes = st.one_of(
    npst.boolean_dtypes(),
    npst.integer_dtypes(endianness="?", sizes=(8, 16, 32, 64)),
    npst.unsigned_integer_dtypes(endianness="?", sizes=(8, 16, 32, 64)),
    npst.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    npst.complex_number_dtypes(endianness="?", sizes=(64, 128)),
)
_names = st.text(min_size=1, max_size=MAX_NAME_CHARS)
_labels = st.text(max_size=MAX_NAME_CHARS)
_meta_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),  # NaN and infinities included
    st.text(max_size=20),
    st.binary(max_size=20),
)
_meta_values = st.recursive(
    _meta_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)
_metas = st.dictionaries(st.text(max_size=12), _meta_values, max_size=6)


@st.composite
def _layouts(draw, arr: np.ndarray) -> np.ndarray:
    """The same values, handed to encode as C order, Fortran order or a strided view."""
    layout = draw(st.sampled_from(["c", "f", "strided"]))
    if layout == "f":
        return np.asfortranarray(arr)
    if layout == "strided" and arr.ndim:
        return np.repeat(arr, 2, axis=-1)[..., ::2]
    return arr


@st.composite
def messages(draw) -> Message:
    mtype = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    block = mtype in BLOCK_TYPES
    n_arrays = draw(st.integers(0, 5))
    names = draw(st.lists(_names, min_size=n_arrays, max_size=n_arrays, unique=True))
    huge_empty = False
    if block and names:
        huge_empty = draw(st.integers(0, 9)) == 0
        # a block of many points whose arrays are all empty (a zero on another axis)
        count = draw(st.integers(7, MAX_COUNT - 1)) if huge_empty else draw(st.integers(0, 6))
    else:
        count = draw(st.one_of(st.integers(0, 6), st.integers(0, MAX_COUNT), st.sampled_from([0, MAX_COUNT])))
    index = draw(st.one_of(st.integers(0, 1000), st.integers(0, MAX_INDEX - 1), st.just(MAX_INDEX - 1)))
    arrays = {}
    for name in names:
        dtype = draw(_dtypes)
        if huge_empty:
            rest = draw(npst.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=3))
            rest = (0, *rest[1:])
            arr = np.empty((count, *rest), dtype=dtype)
        else:
            if block:
                rest = draw(npst.array_shapes(min_dims=0, max_dims=MAX_NDIM - 1, min_side=0, max_side=3))
                shape = (count, *rest)
            else:
                shape = draw(npst.array_shapes(min_dims=0, max_dims=MAX_NDIM, min_side=0, max_side=3))
            arr = draw(npst.arrays(dtype, shape))
            arr = draw(_layouts(arr))
        arrays[name] = arr
    return Message(
        type=mtype,
        scan=draw(_labels),
        stream=draw(_labels),
        index=index,
        count=count,
        arrays=arrays,
        meta=draw(_metas),
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def inproc_pair(zctx):
    pull = zctx.socket(zmq.PULL)
    pull.rcvtimeo = RECV_TIMEOUT_MS
    pull.bind("inproc://codec-property")
    push = zctx.socket(zmq.PUSH)
    push.sndtimeo = RECV_TIMEOUT_MS
    push.connect("inproc://codec-property")
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)


@pytest.fixture
def tcp_push_pull(zctx):
    pull = zctx.socket(zmq.PULL)
    pull.rcvtimeo = RECV_TIMEOUT_MS
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = zctx.socket(zmq.PUSH)
    push.sndtimeo = RECV_TIMEOUT_MS
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)


@pytest.fixture
def tcp_router_dealer(zctx):
    router = zctx.socket(zmq.ROUTER)
    router.rcvtimeo = RECV_TIMEOUT_MS
    router.sndtimeo = RECV_TIMEOUT_MS
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = zctx.socket(zmq.DEALER)
    dealer.rcvtimeo = RECV_TIMEOUT_MS
    dealer.sndtimeo = RECV_TIMEOUT_MS
    dealer.identity = b"worker-7"
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    dealer.close(linger=0)
    router.close(linger=0)


# --------------------------------------------------------------------------- round trips


@settings(
    max_examples=int(__import__("os").environ.get("CODEC_PROPERTY_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(msg=messages())
def test_roundtrip_property(msg: Message, inproc_pair) -> None:
    frames = encode(msg)
    assert isinstance(frames[0], bytes)
    assert len(frames) == 1 + len(msg.arrays)

    # plain buffers, as encode hands them out
    _assert_same_message(decode(frames), msg)
    # zmq.Frame objects, as recv_multipart(copy=False) hands them out
    _assert_same_message(decode([zmq.Frame(f) for f in frames]), msg)
    # bytes copies, and a tuple instead of a list
    _assert_same_message(decode(tuple(bytes(f) for f in frames)), msg)
    # a real (inproc) socket hop through codec.send / codec.recv
    push, pull = inproc_pair
    codec.send(push, msg)
    _assert_same_message(codec.recv(pull), msg)


def test_roundtrip_every_type_minimal() -> None:
    for mtype in sorted(MESSAGE_TYPES):
        msg = Message(mtype)
        _assert_same_message(decode(encode(msg)), msg)


def test_encode_is_zero_copy_for_contiguous_arrays() -> None:
    arr = np.arange(4096, dtype="<u4").reshape(1, 4096)
    frames = encode(Message(DATA, "s", "mca", 0, 1, {"spectrum": arr}))
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), arr)


def test_decoded_arrays_are_views_over_frames() -> None:
    arr = np.linspace(0, 1, 1000).reshape(10, 100)
    frames = [bytearray(f) for f in encode(Message(RESULT, count=10, arrays={"roi": arr}))]
    out = decode(frames).arrays["roi"]
    assert not out.flags.owndata
    assert _address(out) == _address(np.frombuffer(frames[1], dtype=np.uint8))


def test_push_pull_tcp_large_array_zero_copy(tcp_push_pull) -> None:
    push, pull = tcp_push_pull
    rng = np.random.default_rng(20240601)
    frame = rng.random((1, 1024, 1024), dtype=np.float32)  # 4 MiB detector frame
    counters = {"i0": np.array([1.5e6]), "t": np.array([0.01])}
    msg = Message(DATA, "scan-42", "eiger", 1234, 1, {"frame": frame, **counters}, {"exposure": 0.01})

    # via codec.send / codec.recv
    codec.send(push, msg)
    got = codec.recv(pull)
    _assert_same_message(got, msg)
    out = got.arrays["frame"]
    assert out.nbytes == 4 * 1024 * 1024
    assert not out.flags.owndata
    chain = _base_chain(out)
    assert isinstance(chain[-1], zmq.Frame), [type(o).__name__ for o in chain]
    assert _address(out) == _frame_address(chain[-1])

    # the same, keeping hold of the received frames to compare addresses
    codec.send(push, msg)
    frames = pull.recv_multipart(copy=False)
    got = decode(frames)
    _assert_same_message(got, msg)
    for frame_obj, name in zip(frames[1:], msg.arrays):
        assert _address(got.arrays[name]) == _frame_address(frame_obj)
        assert not got.arrays[name].flags.owndata


def test_router_dealer_tcp_recv_routed(tcp_router_dealer) -> None:
    router, dealer = tcp_router_dealer
    frame = np.arange(1024 * 1024, dtype="<u4").reshape(1, 1024, 1024)  # 4 MiB
    msg = Message(DATA, "scan-42", "eiger", 7, 1, {"frame": frame}, {"roi": [0, 10, 0, 10]})
    codec.send(dealer, msg)
    identity, got = codec.recv_routed(router)
    assert identity == b"worker-7"
    _assert_same_message(got, msg)
    assert not got.arrays["frame"].flags.owndata
    assert isinstance(_base_chain(got.arrays["frame"])[-1], zmq.Frame)

    # and back, addressed with the routing prefix
    reply = Message(CREDIT, "scan-42", "eiger", 8, 16, meta={"window": 16})
    codec.send(router, reply, prefix=[identity])
    _assert_same_message(codec.recv(dealer), reply)

    # a malformed message is consumed and reported as CodecError; the next one still arrives
    dealer.send_multipart([b"\xc1not msgpack"])
    with pytest.raises(CodecError, match="not valid msgpack"):
        codec.recv_routed(router)
    codec.send(dealer, msg)
    identity, got = codec.recv_routed(router)
    assert identity == b"worker-7"
    _assert_same_message(got, msg)


def test_recv_on_malformed_push_pull_message_consumes_it(tcp_push_pull) -> None:
    push, pull = tcp_push_pull
    push.send_multipart([_pack(_header()), b"unexpected buffer"])
    with pytest.raises(CodecError, match="buffer frames for 0 array descriptors"):
        codec.recv(pull)
    ok = Message(SCAN_END, "scan-1", meta={"points": 100})
    codec.send(push, ok)
    _assert_same_message(codec.recv(pull), ok)


def test_recv_routed_without_identity() -> None:
    """A one-frame message read as if routed (e.g. recv_routed on the wrong socket type)."""
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(_pack(_header()))
        pull.rcvtimeo = 5000
        with pytest.raises(CodecError, match="without identity"):
            codec.recv_routed(pull)
    finally:
        push.close(0)
        pull.close(0)


# --------------------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(np.array([1, "a"], dtype=object), id="object"),
        pytest.param(np.array(["ab", "c"]), id="unicode"),
        pytest.param(np.array([b"ab", b"c"]), id="bytes"),
        pytest.param(np.zeros(2, dtype=[("a", "<f8"), ("b", "<i4")]), id="structured"),
        pytest.param(np.zeros(2, dtype=np.dtype((np.int32, {"lo": (np.int16, 0), "hi": (np.int16, 2)}))), id="int-with-fields"),
        pytest.param(np.zeros(2, dtype="V8"), id="void"),
        pytest.param(np.zeros(2, dtype="M8[s]"), id="datetime"),
        pytest.param(np.zeros(2, dtype="m8[s]"), id="timedelta"),
        pytest.param(["a", "b"], id="list-of-str"),
    ],
)
def test_encode_refuses_non_numeric_dtype(value) -> None:
    with pytest.raises(CodecError, match="not numeric"):
        encode(Message(ACK, arrays={"a": value}))


@pytest.mark.parametrize(
    ("mtype", "count", "shape"),
    [(DATA, 3, (2,)), (RESULT, 1, (2, 4)), (GAP, 0, (1,)), (DATA, 1, ()), (GAP, 2, (0, 2))],
)
def test_encode_refuses_wrong_leading_axis(mtype, count, shape) -> None:
    with pytest.raises(CodecError, match="leading axis"):
        encode(Message(mtype, count=count, arrays={"a": np.zeros(shape)}))


def test_encode_accepts_any_shape_for_non_block_types() -> None:
    for mtype in sorted(MESSAGE_TYPES - BLOCK_TYPES):
        msg = Message(mtype, count=3, arrays={"scalar": np.float64(2.5), "m": np.eye(2)})
        got = decode(encode(msg))
        assert got.arrays["scalar"].shape == () and got.arrays["scalar"] == 2.5


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(type="bogus"), "unknown message type"),
        (dict(type=5), "unknown message type"),
        (dict(type=b"data"), "unknown message type"),
        (dict(type=ACK, index=-1), "index -1 out of range"),
        (dict(type=ACK, index=True), "index True out of range"),
        (dict(type=ACK, index=1.0), "index 1.0 out of range"),
        (dict(type=ACK, index=MAX_INDEX), "out of range"),
        (dict(type=ACK, index=np.int64(3)), "out of range"),
        (dict(type=ACK, count=-1), "count -1 out of range"),
        (dict(type=ACK, count=False), "count False out of range"),
        (dict(type=ACK, count=MAX_COUNT + 1), "out of range"),
        (dict(type=ACK, scan="s" * (MAX_NAME_CHARS + 1)), "scan must be a string"),
        (dict(type=ACK, stream="s" * (MAX_NAME_CHARS + 1)), "stream must be a string"),
        (dict(type=ACK, scan=None), "scan must be a string"),
        (dict(type=ACK, stream=b"eiger"), "stream must be a string"),
    ],
)
def test_encode_refuses_bad_scalar_fields(fields, match) -> None:
    with pytest.raises(CodecError, match=match):
        encode(Message(**fields))


@pytest.mark.parametrize(
    "name",
    ["n" * (MAX_NAME_CHARS + 1), "", 3, b"frame", None],
    ids=["too-long", "empty", "int", "bytes", "none"],
)
def test_encode_refuses_bad_array_names(name) -> None:
    with pytest.raises(CodecError, match="bad array name"):
        encode(Message(ACK, arrays={name: np.zeros(1)}))


def test_encode_accepts_longest_names() -> None:
    name = "n" * MAX_NAME_CHARS
    msg = Message(ACK, scan=name, stream=name, arrays={name: np.zeros(1)})
    _assert_same_message(decode(encode(msg)), msg)


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param({"a": {1, 2}}, id="set"),
        pytest.param({"a": np.int64(3)}, id="numpy-int64"),
        pytest.param({"a": np.float32(1.5)}, id="numpy-float32"),
        pytest.param({"a": np.bool_(True)}, id="numpy-bool"),
        pytest.param({"a": np.zeros(3)}, id="ndarray"),
        pytest.param({"a": object()}, id="object"),
        pytest.param({"a": 2**64}, id="int-too-big"),
        pytest.param({"a": -(2**63) - 1}, id="int-too-small"),
        pytest.param({"a": [{"b": {"c": 1j}}]}, id="nested-complex"),
    ],
)
def test_encode_refuses_unserialisable_meta(meta) -> None:
    with pytest.raises(CodecError, match="not serialisable"):
        encode(Message(ACK, meta=meta))


def test_encode_refuses_meta_not_dict() -> None:
    with pytest.raises(CodecError, match="meta must be a dict"):
        encode(Message(ACK, meta=[("a", 1)]))


def test_encode_refuses_too_many_dimensions() -> None:
    with pytest.raises(CodecError, match="9 dimensions > 8"):
        encode(Message(ACK, arrays={"a": np.zeros((1,) * (MAX_NDIM + 1))}))
    with pytest.raises(CodecError, match="dimensions"):
        encode(Message(DATA, count=1, arrays={"a": np.zeros((1,) * (MAX_NDIM + 1))}))
    # the limit itself is fine
    msg = Message(DATA, count=1, arrays={"a": np.zeros((1,) * MAX_NDIM)})
    _assert_same_message(decode(encode(msg)), msg)


def test_encode_refuses_too_many_arrays() -> None:
    arrays = {f"a{i}": np.zeros(1) for i in range(MAX_ARRAYS + 1)}
    with pytest.raises(CodecError, match="too many arrays"):
        encode(Message(ACK, arrays=arrays))
    del arrays["a0"]
    assert len(decode(encode(Message(ACK, arrays=arrays))).arrays) == MAX_ARRAYS


def test_encode_refuses_oversized_header() -> None:
    with pytest.raises(CodecError, match="header of .* bytes >"):
        encode(Message(ACK, meta={"blob": "x" * MAX_HEADER_BYTES}))


# --------------------------------------------------------------------------- decode rejections


def _descr(name="a", dtype="<f8", shape=(1,)):
    return [name, dtype, list(shape)]


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        pytest.param([], "empty message", id="empty-list"),
        pytest.param((), "empty message", id="empty-tuple"),
        pytest.param(None, "list of frames", id="none"),
        pytest.param(b"\x88", "list of frames", id="bytes-not-a-list"),
        pytest.param([None], "not a buffer", id="header-none"),
        pytest.param(["text"], "not a buffer", id="header-str"),
        pytest.param([b""], "not valid msgpack", id="header-empty"),
        pytest.param([b"\xc1"], "not valid msgpack", id="header-reserved-byte"),
        pytest.param([b"\x88\xa1v"], "not valid msgpack", id="header-truncated"),
        pytest.param([b"not msgpack at all"], "not valid msgpack", id="header-text"),
        pytest.param([_pack(_header()) + b"\x00"], "not valid msgpack", id="header-trailing-bytes"),
        pytest.param([b"\x91" * 100_000], "not valid msgpack", id="header-deep-nesting"),
        pytest.param([msgpack.packb({1: 2})], "not valid msgpack", id="header-int-key"),
        pytest.param([msgpack.packb(_header(meta={"t": msgpack.Timestamp(1)}))], "not valid msgpack", id="ext-type"),
        pytest.param([b"\x00" * (MAX_HEADER_BYTES + 1)], "header of", id="header-too-large"),
        pytest.param([_pack([1, 2])], "header is not a map", id="header-list"),
        pytest.param([_pack(7)], "header is not a map", id="header-int"),
        pytest.param([_pack(None)], "header is not a map", id="header-nil"),
    ],
)
def test_decode_rejects_bad_header_frames(frames, match) -> None:
    with pytest.raises(CodecError, match=match):
        decode(frames)


def _without(key):
    header = _header()
    del header[key]
    return header


@pytest.mark.parametrize(
    ("header", "bufs", "match"),
    [
        # keys
        (_without("meta"), [], r"missing \['meta'\], unexpected \[\]"),
        (_without("v"), [], r"missing \['v'\]"),
        ({}, [], "missing"),
        (_header(extra=1), [], r"unexpected \['extra'\]"),
        ({**_header(), b"v": 1}, [], "unexpected"),
        # version
        (_header(v=2), [], "unsupported wire version 2"),
        (_header(v=0), [], "unsupported wire version 0"),
        (_header(v=True), [], "unsupported wire version True"),
        (_header(v=1.0), [], "unsupported wire version 1.0"),
        (_header(v="1"), [], "unsupported wire version '1'"),
        (_header(v=None), [], "unsupported wire version None"),
        # type
        (_header(t="bogus"), [], "unknown message type 'bogus'"),
        (_header(t=""), [], "unknown message type"),
        (_header(t="DATA"), [], "unknown message type"),
        (_header(t=b"data"), [], "unknown message type"),
        (_header(t=["data"]), [], r"unknown message type \['data'\]"),
        (_header(t={"data": 1}), [], "unknown message type"),
        (_header(t=3), [], "unknown message type"),
        # scan / stream
        (_header(scan=3), [], "scan must be a string"),
        (_header(stream=b"eiger"), [], "stream must be a string"),
        (_header(scan="s" * (MAX_NAME_CHARS + 1)), [], "scan must be a string"),
        # index / count
        (_header(index=-1), [], "index -1 out of range"),
        (_header(index=MAX_INDEX), [], "out of range"),
        (_header(index=2**64 - 1), [], "out of range"),
        (_header(index=True), [], "index True out of range"),
        (_header(index=1.0), [], "index 1.0 out of range"),
        (_header(index=None), [], "index None out of range"),
        (_header(count=-1), [], "count -1 out of range"),
        (_header(count=-(2**63)), [], "out of range"),
        (_header(count=MAX_COUNT + 1), [], "out of range"),
        (_header(count=False), [], "count False out of range"),
        # meta
        (_header(meta=[]), [], "meta is not a map"),
        (_header(meta="x"), [], "meta is not a map"),
        (_header(meta=None), [], "meta is not a map"),
        # arrays list
        (_header(arrays={}), [], "arrays is not a list"),
        (_header(arrays=None), [], "arrays is not a list"),
        (_header(arrays=[_descr(f"a{i}") for i in range(MAX_ARRAYS + 1)]), [b"\0" * 8] * (MAX_ARRAYS + 1), "arrays is not a list"),
        # frame count
        (_header(arrays=[_descr()]), [], "0 buffer frames for 1 array descriptors"),
        (_header(arrays=[_descr(), _descr("b")]), [b"\0" * 8], "1 buffer frames for 2 array descriptors"),
        (_header(), [b""], "1 buffer frames for 0 array descriptors"),
        (_header(arrays=[_descr()]), [b"\0" * 8, b"\0" * 8], "2 buffer frames for 1 array descriptors"),
        # descriptors
        (_header(arrays=["a"]), [b""], "descriptor is not"),
        (_header(arrays=[["a", "<f8"]]), [b""], "descriptor is not"),
        (_header(arrays=[["a", "<f8", [1], 0]]), [b""], "fourth entry"),
        (_header(arrays=[{"a": 1}]), [b""], "descriptor is not"),
        (_header(arrays=[_descr(name="")]), [b"\0" * 8], "bad array name ''"),
        (_header(arrays=[_descr(name=7)]), [b"\0" * 8], "bad array name 7"),
        (_header(arrays=[_descr(name="n" * (MAX_NAME_CHARS + 1))]), [b"\0" * 8], "bad array name"),
        (_header(arrays=[_descr(), _descr()]), [b"\0" * 8] * 2, "'a' appears twice"),
        # dtypes: only canonical numeric dtype strings
        (_header(arrays=[_descr(dtype="float32")]), [b"\0" * 4], "'float32' is not a canonical numeric dtype"),
        (_header(arrays=[_descr(dtype="f8")]), [b"\0" * 8], "'f8' is not a canonical"),
        (_header(arrays=[_descr(dtype="=f8")]), [b"\0" * 8], "'=f8' is not a canonical"),
        (_header(arrays=[_descr(dtype=">u1")]), [b"\0"], "'>u1' is not a canonical"),
        (_header(arrays=[_descr(dtype="<u1")]), [b"\0"], "'<u1' is not a canonical"),
        (_header(arrays=[_descr(dtype="?")]), [b"\0"], "'\\?' is not a canonical"),
        (_header(arrays=[_descr(dtype="|O")]), [b"\0" * 8], "'\\|O' is not a canonical"),
        (_header(arrays=[_descr(dtype="V8")]), [b"\0" * 8], "'V8' is not a canonical"),
        (_header(arrays=[_descr(dtype="|V8")]), [b"\0" * 8], "'\\|V8' is not a canonical"),
        (_header(arrays=[_descr(dtype="U4")]), [b"\0" * 16], "'U4' is not a canonical"),
        (_header(arrays=[_descr(dtype="<U4")]), [b"\0" * 16], "'<U4' is not a canonical"),
        (_header(arrays=[_descr(dtype="|S4")]), [b"\0" * 4], "'\\|S4' is not a canonical"),
        (_header(arrays=[_descr(dtype="<M8[s]")]), [b"\0" * 8], "not a canonical"),
        (_header(arrays=[_descr(dtype="<M8")]), [b"\0" * 8], "not a canonical"),
        (_header(arrays=[_descr(dtype="(2,)<f8")]), [b"\0" * 16], "not a canonical"),
        (_header(arrays=[_descr(dtype="<f4,<f4")]), [b"\0" * 8], "not a canonical"),
        (_header(arrays=[_descr(dtype="xyz")]), [b"\0" * 8], "dtype 'xyz' is not a canonical"),
        (_header(arrays=[_descr(dtype="")]), [b"\0" * 8], "dtype '' is not a canonical"),
        (_header(arrays=[_descr(dtype=8)]), [b"\0" * 8], "bad dtype 8"),
        (_header(arrays=[_descr(dtype=None)]), [b"\0" * 8], "bad dtype None"),
        (_header(arrays=[_descr(dtype=b"<f8")]), [b"\0" * 8], "bad dtype"),
        (_header(arrays=[_descr(dtype=["<f8"])]), [b"\0" * 8], "bad dtype"),
        # shapes
        (_header(arrays=[_descr(shape=[-1])]), [b""], "bad size -1 in shape"),
        (_header(arrays=[_descr(shape=[2, -3])]), [b""], "bad size -3 in shape"),
        (_header(arrays=[_descr(shape=[1.0])]), [b"\0" * 8], "bad size 1.0 in shape"),
        (_header(arrays=[_descr(shape=[True])]), [b"\0" * 8], "bad size True in shape"),
        (_header(arrays=[_descr(shape=["1"])]), [b"\0" * 8], "bad size '1' in shape"),
        (_header(arrays=[_descr(shape=[None])]), [b"\0" * 8], "bad size None in shape"),
        (_header(arrays=[_descr(shape=[[1]])]), [b"\0" * 8], r"bad size \[1\] in shape"),
        (_header(arrays=[_descr(shape=[MAX_COUNT])]), [b""], "bad size"),
        (_header(arrays=[["a", "<f8", 1]]), [b"\0" * 8], "shape must be a list"),
        (_header(arrays=[["a", "<f8", None]]), [b"\0" * 8], "shape must be a list"),
        (_header(arrays=[["a", "<f8", [1] * (MAX_NDIM + 1)]]), [b"\0" * 8], "shape must be a list of at most 8"),
        # buffer length
        (_header(arrays=[_descr(shape=[2])]), [b"\0" * 15], "buffer of 15 bytes, descriptor <f8\\[2\\] needs 16"),
        (_header(arrays=[_descr(shape=[2])]), [b"\0" * 17], "buffer of 17 bytes"),
        (_header(arrays=[_descr(shape=[2])]), [b""], "buffer of 0 bytes"),
        (_header(arrays=[_descr(shape=[0])]), [b"\0"], "buffer of 1 bytes, descriptor <f8\\[0\\] needs 0"),
        (_header(arrays=[_descr(shape=[])]), [b"\0" * 4], "buffer of 4 bytes"),
        (_header(arrays=[_descr(dtype="<c16", shape=[3, 2])]), [b"\0" * 95], "needs 96"),
        (_header(arrays=[_descr(dtype="<f8", shape=[1])]), [None], "not a buffer"),
        # block leading axis
        (_header(t=DATA, count=2, arrays=[_descr(shape=[1])]), [b"\0" * 8], r"leading axis \[1\] != block count 2"),
        (_header(t=RESULT, count=1, arrays=[_descr(shape=[])]), [b"\0" * 8], r"leading axis \[\] != block count 1"),
        (_header(t=GAP, count=0, arrays=[_descr(shape=[1, 0])]), [b""], "leading axis"),
    ],
)
def test_decode_rejects(header, bufs, match) -> None:
    frames = [_pack(header), *bufs]
    with pytest.raises(CodecError, match=match):
        decode(frames)
    # the same through zmq.Frame objects (buffers that are buffers)
    if all(isinstance(b, bytes) for b in bufs):
        with pytest.raises(CodecError, match=match):
            decode([zmq.Frame(f) for f in frames])


def test_decode_accepts_hand_made_frames() -> None:
    """The reference point for the rejections above: the minimal valid variants."""
    msg = decode([_pack(_header(t=DATA, count=2, arrays=[_descr(shape=[2, 3])])), b"\0" * 48])
    assert msg.type == DATA and msg.arrays["a"].shape == (2, 3) and msg.arrays["a"].dtype == np.float64
    msg = decode([_pack(_header(arrays=[_descr(dtype=">u4", shape=[])])), b"\0\0\1\0"])
    assert msg.arrays["a"][()] == 256
    msg = decode([_pack(_header(arrays=[_descr(dtype="<f8", shape=[0, 5])])), b""])
    assert msg.arrays["a"].shape == (0, 5)
    msg = decode([_pack(_header(meta={"nested": {"a": [1, 2.5, None, True, b"x"]}}))])
    assert _same(msg.meta, {"nested": {"a": [1, 2.5, None, True, b"x"]}})
    # memoryview frames with a non-byte format are read as bytes
    msg = decode([_pack(_header(arrays=[_descr(shape=[4])])), memoryview(np.arange(4.0))])
    assert np.array_equal(msg.arrays["a"], np.arange(4.0))
    for mtype in sorted(MESSAGE_TYPES):
        assert decode([_pack(_header(t=mtype))]).type == mtype
    for mtype in (SCAN_START, SCAN_END, SCAN_ABORT):
        assert decode([_pack(_header(t=mtype, count=MAX_COUNT, index=MAX_INDEX - 1))]).count == MAX_COUNT


# --------------------------------------------------------------------------- regressions
#
# Defects found by the fuzz and property tests, kept so they stay fixed.


def test_decode_zero_size_array_with_huge_shape_raises_codec_error() -> None:
    # valid-looking descriptor: every size < 2**31, one of them 0, buffer empty;
    # np.empty(shape) refuses because the non-zero sizes overflow intp.
    frames = [_pack(_header(arrays=[_descr(shape=[0, MAX_COUNT - 1, MAX_COUNT - 1, MAX_COUNT - 1])])), b""]
    with pytest.raises(CodecError, match="too large"):
        decode(frames)


def test_meta_and_shapes_decode_refuses_never_arrive() -> None:
    """Whatever encode lets through here, decode refuses (CodecError, not garbage)."""
    for msg in (
        Message(ACK, meta={"by_channel": {1: "fluo"}}),
        Message(ACK, meta={"big": [0] * 1_000_001}),
        Message(DATA, count=MAX_COUNT, arrays={"a": np.empty((MAX_COUNT, 0))}),
        Message(ACK, arrays={"a": np.empty((0, MAX_COUNT))}),
    ):
        try:
            frames = encode(msg)
        except CodecError:
            continue
        with pytest.raises(CodecError):
            decode(frames)


@pytest.mark.parametrize(
    "meta",
    [{"by_channel": {1: "fluo"}}, {"k": {1.5: 0}}, {"k": {None: 0}}, {"big": [0] * 1_000_001}],
    ids=["int-key", "float-key", "nil-key", "list-over-unpack-limit"],
)
def test_encode_refuses_meta_decode_would_refuse(meta) -> None:
    # decode unpacks with strict_map_key=True and max_array_len/max_map_len=1e6
    with pytest.raises(CodecError):
        encode(Message(ACK, meta=meta))


@pytest.mark.parametrize(
    "msg",
    [
        Message(DATA, count=MAX_COUNT, arrays={"a": np.empty((MAX_COUNT, 0))}),
        Message(ACK, arrays={"a": np.empty((0, MAX_COUNT))}),
    ],
    ids=["block-count-2**31", "zero-size-wide"],
)
def test_encode_refuses_sizes_decode_would_refuse(msg) -> None:
    with pytest.raises(CodecError):
        encode(msg)


def test_encode_ragged_array_raises_codec_error() -> None:
    with pytest.raises(CodecError, match="not an array"):
        encode(Message(ACK, arrays={"a": [[1.0], [1.0, 2.0]]}))


@pytest.mark.parametrize(
    "frame",
    [np.arange(16, dtype=np.uint8)[::2], np.zeros(1, dtype="M8[s]")],
    ids=["non-contiguous-buffer", "datetime-array-buffer"],
)
def test_decode_odd_buffer_objects_raise_codec_error(frame) -> None:
    # not reachable from a socket (zmq frames are contiguous bytes), only from
    # callers handing decode their own buffer objects
    with pytest.raises(CodecError, match="not a buffer"):
        decode([_pack(_header(arrays=[_descr(dtype="|u1", shape=[8])])), frame])


# --------------------------------------------------------------------------- fuzz

FUZZ_CASES = 100_000
FUZZ_SEED = 0x7A_4E_60_DE

# values a hostile or broken peer might put anywhere in a header
_EVIL = [
    None, True, False, 0, 1, -1, 7, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**63, 2**64 - 1, -(2**63),
    0.0, -0.0, 1.5, float("nan"), float("inf"), "", "a", "x" * 300, "data", "ack", "gap", b"", b"data",
    [], [0], [1], [-1], [0, 2], [2, 0], [True], [1.0], ["1"], [None], [[1]], [1] * 9, [2**31 - 1] * 2,
    [0, 2**31 - 1, 2**31 - 1], [2**31 - 1, 2**31 - 1, 0], {}, {"a": 1}, {"v": 1},
    "<f8", ">f8", "|u1", "<u1", "|b1", "?", "float32", "|O", "V8", "U4", "<M8", "(2,)<f8", "<f16", "<c32",
    ["a", "<f8", [1]], ["a", "<f8"], [["a", "<f8", [1]]], [["a", "<f8", [0]], ["a", "<f8", [0]]],
]


def _fuzz_corpus() -> list[tuple[dict, list[bytes]]]:
    rng = np.random.default_rng(1)
    msgs = [
        Message(SCAN_START, "scan-1", "", 0, 0, {}, {"motors": ["samx", "samy"], "npoints": 10_000}),
        Message(SCAN_END, "scan-1", "", 0, 10_000, {}, {"status": "ok"}),
        Message(SCAN_ABORT, "scan-1", meta={"reason": "beam lost"}),
        Message(CREDIT, "scan-1", "eiger", 100, 32),
        Message(ACK, "scan-1", "eiger", 99, 1),
        Message(GAP, "scan-1", "xspress3", 17, 3, {"missing": np.ones(3, dtype="|b1")}),
        Message(DATA, "scan-1", "counters", 5, 1, {k: np.array([rng.random()]) for k in "abcdefgh"}),
        Message(DATA, "scan-1", "points", 0, 100, {"x": rng.random(100), "y": rng.random(100), "i": np.arange(100, dtype=">i4")}),
        Message(DATA, "scan-1", "mca", 3, 1, {"spectrum": rng.integers(0, 1000, (1, 4096), dtype="<u4")}),
        Message(RESULT, "scan-1", "roi", 3, 2, {"sum": rng.random((2, 4)).astype("<f4"), "c": np.zeros((2, 2), "<c8")}),
        Message(DATA, "scan-1", "empty", 0, 0, {"a": np.zeros((0, 3), "<f2"), "b": np.zeros((0,), "|i1")}),
        Message(ACK, arrays={"scalar": np.array(3, ">u8"), "cube": np.zeros((1, 2, 1, 2, 1, 2, 1, 2))}),
    ]
    corpus = []
    for msg in msgs:
        frames = [bytes(f) for f in encode(msg)]
        corpus.append((msgpack.unpackb(frames[0], raw=False), frames))
    return corpus


def _mutate(rng: np.random.Generator, corpus) -> list:
    header_obj, frames = corpus[int(rng.integers(len(corpus)))]
    frames = list(frames)
    mode = int(rng.integers(16))
    if mode == 0:  # flip bits in the header
        h = bytearray(frames[0])
        for pos in rng.integers(0, len(h), int(rng.integers(1, 4))) if h else ():
            h[pos] ^= int(rng.integers(1, 256))
        frames[0] = bytes(h)
    elif mode == 1:  # overwrite header bytes with msgpack-significant values
        h = bytearray(frames[0])
        for pos in rng.integers(0, len(h), int(rng.integers(1, 3))) if h else ():
            h[pos] = int(rng.choice([0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCB,
                                     0xCC, 0xCE, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9, 0xDC, 0xDE, 0xDF, 0xE0, 0xFF]))
        frames[0] = bytes(h)
    elif mode == 2:  # insert bytes into the header
        h = frames[0]
        pos = int(rng.integers(0, len(h) + 1))
        frames[0] = h[:pos] + rng.bytes(int(rng.integers(1, 9))) + h[pos:]
    elif mode == 3:  # delete bytes from the header
        h = frames[0]
        pos = int(rng.integers(0, len(h))) if h else 0
        frames[0] = h[:pos] + h[pos + int(rng.integers(1, 9)):]
    elif mode == 4:  # truncate or extend the header
        h = frames[0]
        frames[0] = h[: int(rng.integers(0, len(h)))] if h and rng.random() < 0.5 else h + rng.bytes(int(rng.integers(1, 9)))
    elif mode == 5 and len(frames) > 1:  # truncate or extend a buffer
        i = int(rng.integers(1, len(frames)))
        b = frames[i]
        if b and rng.random() < 0.5:
            frames[i] = b[: int(rng.integers(0, len(b)))]
        else:
            frames[i] = b + rng.bytes(int(rng.integers(1, 17)))
    elif mode == 6 and frames:  # drop a frame
        del frames[int(rng.integers(len(frames)))]
    elif mode == 7:  # add a frame
        extra = rng.bytes(int(rng.integers(0, 65))) if rng.random() < 0.5 else frames[int(rng.integers(len(frames)))]
        frames.insert(int(rng.integers(0, len(frames) + 1)), extra)
    elif mode == 8:  # reorder frames
        order = rng.permutation(len(frames))
        frames = [frames[i] for i in order]
    elif mode == 9:  # fully random frames
        frames = [rng.bytes(int(rng.integers(0, 65))) for _ in range(int(rng.integers(0, 5)))]
    elif mode == 10:  # random bytes behind a fixmap-8 marker, to get past the first checks
        frames = [b"\x88" + rng.bytes(int(rng.integers(0, 120))), *frames[1:]]
    elif mode in (11, 12):  # replace, drop or add a header field (structured)
        h = dict(header_obj)
        action = rng.random()
        key = str(rng.choice(sorted(h)))
        if action < 0.8:
            h[key] = _EVIL[int(rng.integers(len(_EVIL)))]
        elif action < 0.9:
            del h[key]
        else:
            h[str(rng.choice(["x", "V", "arrays2"]))] = 1
        frames[0] = msgpack.packb(h, use_bin_type=True)
    elif mode in (13, 14) and header_obj["arrays"]:  # corrupt one field of one descriptor
        h = dict(header_obj)
        descriptors = [list(d) for d in h["arrays"]]
        d = descriptors[int(rng.integers(len(descriptors)))]
        field_ = int(rng.integers(3))
        sizes = [0, 1, 2, 3, 100, -1, 2**16, 2**31 - 1, 2**31]
        if field_ == 2 and rng.random() < 0.3:  # perturb one size only
            shape = list(d[2])
            if shape:
                shape[int(rng.integers(len(shape)))] = int(rng.choice(sizes))
            else:
                shape = [int(rng.integers(0, 3))]
            d[2] = shape
        elif field_ == 2 and rng.random() < 0.5:  # a new shape, keeping the leading axis
            d[2] = [*d[2][:1], *(int(rng.choice(sizes)) for _ in range(int(rng.integers(0, MAX_NDIM + 1))))]
        else:
            d[field_] = _EVIL[int(rng.integers(len(_EVIL)))]
        h["arrays"] = descriptors
        frames[0] = msgpack.packb(h, use_bin_type=True)
    else:  # valid frames, unchanged: must decode
        pass
    if frames and rng.random() < 0.1:  # stack a second mutation
        frames = _mutate(rng, [(header_obj, frames)])
    return frames


@pytest.mark.timeout(120)
def test_decode_fuzz() -> None:
    rng = np.random.default_rng(FUZZ_SEED)
    corpus = _fuzz_corpus()
    accepted = rejected = 0
    failures: list[tuple[list, BaseException]] = []
    start = time.perf_counter()
    for _ in range(FUZZ_CASES):
        frames = _mutate(rng, corpus)
        try:
            msg = decode(frames)
        except CodecError:
            rejected += 1
            continue
        except Exception as exc:  # anything else is a codec bug
            failures.append((frames, exc))
            continue
        assert isinstance(msg, Message)
        for arr in msg.arrays.values():
            assert isinstance(arr, np.ndarray) and arr.dtype.kind in "biufc"
        accepted += 1
    elapsed = time.perf_counter() - start
    print(f"\ndecode fuzz: {FUZZ_CASES} cases in {elapsed:.2f} s, {accepted} decoded, {rejected} rejected, "
          f"{len(failures)} failures")
    assert accepted + rejected + len(failures) == FUZZ_CASES
    assert accepted > 1000 and rejected > 50_000  # the mix exercises both outcomes
    kinds = sorted({f"{type(exc).__name__}: {exc}" for _, exc in failures})
    assert not failures, f"{len(failures)} inputs raised something other than CodecError: {kinds[:10]}; first: {failures[0][0]!r:.600}"
