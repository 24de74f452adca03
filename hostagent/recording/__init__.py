"""Durable local recording: the spool (crash-safe append, group fsync), the session
recorder (seq + hash chain), the shipper (spool -> collector, deleted when acked), and
run sessions (each `agentgate run` recorded as a session of its own)."""
