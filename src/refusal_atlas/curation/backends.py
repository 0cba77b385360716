"""Generation backends for response collection.

`collect.py` talks only to the `GenerationBackend` protocol, so a faster engine can be added
without touching collection, resumability or provenance:

* `TransformersBackend` (default): the shared `load_model` loader and the shared batched generator
  (`mechinterp.generation.iter_generate`: chat template, left padding, length bucketing), so
  collection generates exactly as the causal tests and the model organism do.
* `VLLMBackend`: the place for GPU users. vLLM batches internally, so it yields one chunk per
  `batch_size` prompts to keep the resume granularity. It needs `pip install vllm` (not a
  dependency of refusal-atlas) and a model spec vLLM understands (a folder or hub id).

A backend yields `(indices, responses)` per finished chunk, indices into the instruction list;
`collect` persists each chunk before asking for the next, which is what makes runs resumable.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, runtime_checkable

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.generation import iter_generate
from refusal_atlas.lm.models import DEFAULT_MODEL_ID, default_model_gguf, load_model


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that changes what a model generates; stored as JSON on every corpus row."""

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AtlasError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise AtlasError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise AtlasError("sampling needs temperature > 0 and 0 < top_p <= 1")

    def output_settings(self) -> dict:
        """The settings that determine the output (batch size does not, for greedy decoding)."""
        d = asdict(self)
        d.pop("batch_size")
        if not self.do_sample:
            d.pop("temperature")
            d.pop("top_p")
        return d


@runtime_checkable
class GenerationBackend(Protocol):
    """What `collect` needs from an inference engine."""

    name: str

    def provenance(self) -> dict:
        """At least `model_id` and `model_revision` (a commit, file hash or content hash)."""
        ...

    def generate(self, instructions: Sequence[str], settings: GenerationSettings
                 ) -> Iterator[tuple[list[int], list[str]]]:
        """Yield (indices, responses) chunk by chunk; every index appears exactly once."""
        ...


def _versions(*packages: str) -> dict[str, str]:

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


class TransformersBackend:
    """Hugging Face transformers through the shared loader (CPU or one GPU)."""

    name = "transformers"

    def __init__(self, lm: Any, *, progress: bool = True) -> None:
        self.lm = lm
        self.progress = progress

    @classmethod
    def from_spec(cls, spec: str = "default", *, device: str | None = None, chat_template: str | None = None,
                  trust_remote_code: bool = False, progress: bool = True) -> TransformersBackend:

        return cls(load_model(spec, device=device, chat_template=chat_template,
                              trust_remote_code=trust_remote_code), progress=progress)

    def provenance(self) -> dict:
        prov = dict(self.lm.provenance())
        prov["backend"] = self.name
        prov["versions"] = _versions("transformers", "torch", "refusal-atlas")
        return prov

    def generate(self, instructions: Sequence[str], settings: GenerationSettings
                 ) -> Iterator[tuple[list[int], list[str]]]:

        yield from iter_generate(
            self.lm, list(instructions), max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
            do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p,
            seed=settings.seed, system=settings.system, progress=self.progress, desc="collect",
        )


class VLLMBackend:
    """vLLM for GPU users (optional; not installed by default)."""

    name = "vllm"

    def __init__(self, spec: str, *, dtype: str = "auto", **engine_kwargs: Any) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise AtlasError("the vllm backend needs vLLM: run `pip install vllm` on a machine with a GPU, "
                             "or use --backend transformers")
        if spec == "default":

            self.model_id, model_arg = DEFAULT_MODEL_ID, str(default_model_gguf())
            engine_kwargs.setdefault("tokenizer", DEFAULT_MODEL_ID)
        else:
            self.model_id, model_arg = spec, spec
        # heavy dependency (slow to import), loaded only when this runs
        from vllm import LLM

        self.llm = LLM(model=model_arg, dtype=dtype, **engine_kwargs)
        self.revision = str(engine_kwargs.get("revision") or "unknown")

    def provenance(self) -> dict:
        return {"model_spec": self.model_id, "model_id": self.model_id, "model_revision": self.revision,
                "backend": self.name, "versions": _versions("vllm", "torch", "refusal-atlas")}

    def generate(self, instructions: Sequence[str], settings: GenerationSettings
                 ) -> Iterator[tuple[list[int], list[str]]]:
        # heavy dependency (slow to import), loaded only when this runs
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=settings.max_new_tokens, seed=settings.seed,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
        )
        system = [{"role": "system", "content": settings.system}] if settings.system else []
        for start in range(0, len(instructions), settings.batch_size):
            idx = list(range(start, min(start + settings.batch_size, len(instructions))))
            chats = [[*system, {"role": "user", "content": instructions[i]}] for i in idx]
            outputs = self.llm.chat(chats, params, use_tqdm=False)
            yield idx, [o.outputs[0].text.strip() for o in outputs]


BACKENDS = ("transformers", "vllm")


def make_backend(name: str, spec: str, **kwargs: Any) -> GenerationBackend:
    """A backend by name for the CLI."""
    if name == "transformers":
        return TransformersBackend.from_spec(spec, **kwargs)
    if name == "vllm":
        kwargs.pop("progress", None)
        return VLLMBackend(spec, **kwargs)
    raise AtlasError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
