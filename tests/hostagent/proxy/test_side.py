"""Side connections (api.OpenSide): a layer asks the driver for a connection of the
proxy's own to its session's server, run by a side layer, whose Answer comes back as
SideAnswered. Nothing of it reaches the client or the recording; one that never answers
times out."""
from __future__ import annotations

import asyncio

from hostagent.protocols.api import (Answer, Close, DataReceived, EofReceived, OpenSide,
                                     SideAnswered, Start, ToClient, ToUpstream)
from hostagent.protocols.registry import ProtocolSpec
from tests.hostagent.proxy import test_driver as d


class Asker:
    """Asks the line server one thing and answers with what it said."""

    def __init__(self, question: bytes, answer: bool = True):
        self.question = question
        self.answer = answer
        self.buf = b""

    def handle(self, event):
        if type(event) is Start:
            return [ToUpstream(self.question + b"\n")]
        if type(event) is DataReceived:
            self.buf += event.data
            if b"\n" in self.buf and self.answer:
                return [Answer(self.buf.split(b"\n")[0].decode()), Close("asked")]
        if type(event) is EofReceived:
            return [Close("gone")]
        return []

    def buffered(self) -> int:
        return len(self.buf)


class SideLayer(d.FakeLayer):
    def line(self, line: bytes):
        if line.startswith(b"SIDE "):
            return [OpenSide(7, Asker(line[5:]))]
        if line.startswith(b"MUTE "):
            return [OpenSide(8, Asker(line[5:], answer=False), timeout=0.5)]
        return super().line(line)

    def handle(self, event):
        if type(event) is SideAnswered:
            return [ToClient(f"side {event.key} {event.value} {event.error}\n".encode())]
        return super().handle(event)


def test_a_side_connection_answers_the_layer_and_stays_out_of_the_session(tmp_path, monkeypatch):
    monkeypatch.setattr(d, "SPEC", ProtocolSpec(name="fake", summary="test", layer=SideLayer,
                                                idle_timeout=3600))

    async def main():
        up = d.Upstream()
        port = await up.start()
        proxy, pport, spool, _ = await d.proxy_for(tmp_path, port)
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        w.write(b"SIDE what\n")
        assert await d.line(r) == b"side 7 echo what \n"   # an answer, no error
        assert up.accepted == 2                       # the session's and the side's
        w.write(b"MUTE silence\n")
        got = await d.line(r)
        assert got.startswith(b"side 8 None side connection timed out after 0.5 s"), got
        w.write(b"after\n")                           # the session goes on
        assert await d.line(r) == b"echo after\n"
        w.close()
        await proxy.close()
        spool.close()
        texts = [f.get("text") for k, f in d.events(spool) if k == "command"]
        assert texts == ["after"]                     # the side's traffic isn't recorded
        assert b"what" in up.got and b"silence" in up.got
    d.run(main())
