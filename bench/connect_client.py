"""The measuring side of bench/connect.py (stdlib only: it runs enrolled, as CMD)."""
import json
import socket
import sys
import time

host, port, sink_port, n, bulk_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
payload = b"x" * 64
t0 = time.perf_counter()
for _ in range(n):
    s = socket.create_connection((host, port))
    s.sendall(payload)
    got = 0
    while got < len(payload):
        got += len(s.recv(4096))
    s.close()
rtt = (time.perf_counter() - t0) / n

chunk = b"y" * (1 << 20)
s = socket.create_connection((host, sink_port))
t0 = time.perf_counter()
for _ in range(bulk_mb):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(16)        # the sink answers once it has everything
bulk = bulk_mb / (time.perf_counter() - t0)
s.close()
print(json.dumps({"connect_rtt_us": rtt * 1e6, "bulk_mib_s": bulk}))
