"""Framing: request heads that could frame two ways."""
from __future__ import annotations

import pytest

from hostagent.protocols.http.wire import HeadError, check_head


def test_check_head_refuses_ambiguous_framing():
    check_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
    for head in (b"POST / HTTP/1.1\r\ncontent-length: 1\r\nCONTENT-LENGTH: 1\r\n\r\n",
                 b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
                 b"POST / HTTP/1.1\nX: a\n\tb\n\n"):
        with pytest.raises(HeadError):
            check_head(head)
