"""PostgreSQL wire protocol v3, sans-IO: framing, the messages the proxy inspects or
writes, and the SCRAM-SHA-256 client used to authenticate upstream with injected
credentials. (The inspecting layer itself plugs into the proxy driver next.)"""
