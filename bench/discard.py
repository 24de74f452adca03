"""A collector that acks every batch and keeps nothing: the host agent alone is measured
(in real deployments the collector is on another machine)."""
from __future__ import annotations

from concurrent import futures

import grpc

from agentgate.frames import iter_frames
from agentgate.v1 import agentgate_pb2 as pb
from agentgate.v1 import agentgate_pb2_grpc as rpc


class _Discard(rpc.IngestServicer):
    def __init__(self):
        self.events = 0

    def Stream(self, request_iterator, context):
        for batch in request_iterator:
            top: dict[str, int] = {}
            events = list(batch.events) + [ev for _, ev in iter_frames(batch.frames)
                                           if not isinstance(ev, dict)]
            for ev in events:
                if ev.seq > top.get(ev.session_id, 0):
                    top[ev.session_id] = ev.seq
            self.events += len(events)
            yield pb.IngestAck(batch_id=batch.batch_id, sessions=[
                pb.SessionAck(session_id=s, committed_seq=q) for s, q in top.items()])


def start() -> tuple[grpc.Server, str, _Discard]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    servicer = _Discard()
    rpc.add_IngestServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", servicer
