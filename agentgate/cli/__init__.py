"""The `agentgate` admin CLI."""
import os

# `agentgate run` forks the agent while gRPC threads exist; gRPC's fork handlers
# would only log a warning, and the child never uses gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
