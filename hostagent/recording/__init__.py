"""Durable local recording: the spool (crash-safe append, group fsync), the session
recorder (seq + hash chain) and the shipper (spool -> collector, deleted when acked)."""
