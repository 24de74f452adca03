"""agentgate: watch and control what automated agents do to infrastructure."""

__version__ = "0.1.0"
