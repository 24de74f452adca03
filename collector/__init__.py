"""The agentgate collector: central gRPC service for recordings, approvals and host agents."""
