"""The `agentgate` admin CLI."""
