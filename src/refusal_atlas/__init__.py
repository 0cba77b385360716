"""refusal-atlas: map sources of harm to refusal mechanisms inside chat models."""

__version__ = "0.1.0"
