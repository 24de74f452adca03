"""The compiled walk over runs of messages (_walk.pyx) and its pure-Python twin give
identical results on any input; the build that CI runs has the compiled one."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres import walk


def test_the_compiled_walk_is_built_and_used():
    assert walk.COMPILED, "make setup builds hostagent/protocols/postgres/_walk.pyx"
    assert walk.skip_frames is not walk.py_skip_frames


frames = st.lists(st.one_of(
    st.builds(lambda b: b"D" + struct.pack("!i", len(b) + 4) + b, st.binary(max_size=12)),
    st.builds(lambda b: b"d" + struct.pack("!i", len(b) + 4) + b, st.binary(max_size=12)),
    st.builds(lambda k, n: bytes([k]) + struct.pack("!i", n), st.sampled_from(b"DdC"),
              st.sampled_from([-1, 0, 3, 4, 5, 1 << 30, -(1 << 31)])),
    st.binary(max_size=6)), max_size=12).map(b"".join)


@settings(max_examples=1000)
@given(frames, st.integers(0, 40), st.integers(0, 80), st.sampled_from([4, 8, 64, 1 << 28]),
       st.sampled_from(b"Dd"))
def test_compiled_and_python_walks_are_twins(data, pos, end, cap, kind):
    end = min(end, len(data))
    pos = min(pos, end)
    expected = walk.py_skip_frames(data, pos, end, cap, kind)
    assert walk.skip_frames(data, pos, end, cap, kind) == expected
    stop, count = expected
    assert pos <= stop <= end and (count == 0) == (stop == pos)


@pytest.mark.parametrize("skip", [walk.py_skip_frames, walk.skip_frames])
def test_a_run_stops_at_another_type_a_partial_message_or_an_impossible_length(skip):
    row = b"D" + struct.pack("!i", 6) + b"ab"
    data = row * 3 + b"C" + struct.pack("!i", 4)
    assert skip(data, 0, len(data), 1 << 20, ord("D")) == (21, 3)
    assert skip(data, 0, 20, 1 << 20, ord("D")) == (14, 2)            # partial third
    assert skip(row + b"D" + struct.pack("!i", 2), 0, 12, 1 << 20, ord("D")) == (7, 1)
    assert skip(row * 2, 0, 14, 5, ord("D")) == (0, 0)                # over the cap


def outcome(fn, *args):
    try:
        return fn(*args)
    except ProtocolError as exc:
        return ("ProtocolError", str(exc))


row_values = st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=12)


@settings(max_examples=1000)
@given(st.one_of(row_values.map(lambda v: m.py_data_row(v)[5:]), st.binary(max_size=40),
                 row_values.map(lambda v: m.py_data_row(v)[5:]).flatmap(
                     lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff" + b[i:]))))
def test_compiled_and_python_data_rows_are_twins(body):
    assert m.parse_data_row is not m.py_parse_data_row and m.data_row is not m.py_data_row
    assert outcome(m.parse_data_row, body) == outcome(m.py_parse_data_row, body)


@settings(max_examples=500)
@given(row_values)
def test_compiled_and_python_rows_are_built_alike(values):
    assert m.data_row(values) == m.py_data_row(values)
    assert m.parse_data_row(m.data_row(values)[5:]) == values
