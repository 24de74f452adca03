"""The agentgate host agent: interception, inline proxy, local recording spool."""
