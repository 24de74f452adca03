"""Bodies: content codings within bounds, the secret scrubber."""
from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.protocols.http.bodies import MaskRefused, Scrubber, decode


def test_decode_bounds():
    with pytest.raises(MaskRefused):
        decode(gzip.compress(b"a" * 10000), [b"gzip"], 1000)
    assert decode(zlib.compress(b"abc"), [b"deflate"], 100) == b"abc"
    raw = zlib.compressobj(wbits=-15)
    assert decode(raw.compress(b"abc") + raw.flush(), [b"deflate"], 100) == b"abc"
    with pytest.raises(MaskRefused):
        decode(b"x", [b"compress"], 100)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(1, 40), max_size=20))
def test_the_scrubber_blanks_a_secret_however_the_stream_is_cut(noise, cuts):
    secret = b"s3cret-value"
    data = noise[:50] + secret + noise[50:] + secret
    s = Scrubber((secret,))
    out, i = b"", 0
    for c in cuts:
        out += s.feed(data[i:i + c])
        i += c
    out += s.feed(data[i:]) + s.flush()
    assert secret not in out and len(out) == len(data)
