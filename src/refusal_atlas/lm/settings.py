"""How to run the model in an experiment: the arguments every forward pass and generation shares."""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["RunSettings"]


@dataclass(frozen=True)
class RunSettings:
    """Batching, chat template and generation length, passed as one object instead of one by one.

    `max_new_tokens` is the length of the generations behind every marker-detector refusal rate;
    `progress` only controls progress bars, never what is computed.
    """

    batch_size: int = 16
    system: str | None = None
    max_new_tokens: int = 12
    progress: bool = True

    def with_(self, **changes: object) -> RunSettings:
        """A copy with some fields changed (`dataclasses.replace` under a short name)."""
        return replace(self, **changes)  # type: ignore[arg-type]
