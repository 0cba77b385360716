"""The shared loader: local folders of every test architecture, chat-template errors, the default model."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import load_model
from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model
from refusal_atlas.paths import cache_dir


@pytest.fixture(scope="module", params=ARCHITECTURES)
def saved_tiny(request, tmp_path_factory):
    lm = tiny_model(request.param)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return request.param, lm, folder


def test_folder_revision_sees_a_change_past_the_first_megabytes(tmp_path):
    # two fine-tunes of one base with frozen embeddings share their first megabytes: they must still differ
    from refusal_atlas.lm.models import _folder_revision

    head = bytes(range(256)) * 8192  # 2 MiB
    for name, tail in (("a", b"\x00" * 64), ("b", b"\x01" + b"\x00" * 63)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(head + tail)
    assert _folder_revision(tmp_path / "a") != _folder_revision(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.safetensors").write_bytes(head + b"\x00" * 64)
    assert _folder_revision(tmp_path / "a") == _folder_revision(tmp_path / "c")


def test_load_folder_matches_in_memory_model(saved_tiny):
    arch, lm, folder = saved_tiny
    loaded = load_model(folder)
    assert loaded.n_layers == lm.n_layers == 4
    assert loaded.d_model == lm.d_model == 64
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None
    assert len(loaded.revision) == 64 and loaded.model_id.endswith(folder.name)
    ids = torch.tensor([loaded.tokenizer(loaded.chat_prompt("Write a poem."), add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        a, b = loaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), arch


def _save_without_template(lm, folder):
    lm.model.save_pretrained(folder)
    tok = lm.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = template
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return template


def test_missing_chat_template_is_a_clear_error_whose_advice_works(tmp_path):
    lm = tiny_model("llama")
    template = _save_without_template(lm, tmp_path)
    with pytest.raises(AtlasError, match="no chat template") as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "--chat-template" not in message  # no command has that option
    assert "chat_template.jinja" in message
    # ... the advice works: a template file in the folder is picked up
    (tmp_path / "chat_template.jinja").write_text(template)
    assert load_model(tmp_path).chat_prompt("hi").endswith("<|im_start|>assistant\n")
    # ... and so does the Python API's argument
    (tmp_path / "chat_template.jinja").unlink()
    assert "assistant" in load_model(tmp_path, chat_template=template).chat_prompt("hi")


def test_not_a_model_is_a_clear_error(tmp_path):
    bogus = tmp_path / "weights.txt"
    bogus.write_text("nothing")
    with pytest.raises(AtlasError, match="not a model folder"):
        load_model(bogus)
    with pytest.raises(AtlasError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(AtlasError, match="could not load model"):
        load_model(tmp_path)  # an empty folder


@pytest.mark.real_model
def test_default_model_loads_from_cache():
    lm = load_model("default")  # first load in a fresh cache dequantizes the GGUF (~20-40 s)
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert lm.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and len(lm.revision) == 64
    assert lm.chat_prompt("hi").endswith("<|im_start|>assistant\n")
    # The second load reads the safetensors copy (no dequantisation); speed is measured in benchmarks/.
    cached = list((cache_dir() / "models").glob("SmolLM2-135M-Instruct*/model.safetensors"))
    assert cached, "the first load must leave a safetensors copy in the user cache"
    again = load_model("default")
    assert again.revision == lm.revision
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(lm.model(x).logits, again.model(x).logits)


def test_other_processes_cpu_use_is_seen_and_own_is_not():
    import subprocess
    import sys

    from refusal_atlas.lm.models import _others_busy_cores, auto_threads

    spin = "import time\nend = time.time() + 5\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        busy = _others_busy_cores(1.0)
    finally:
        spinner.kill()
    assert busy is not None and busy >= 0.6  # a process spinning one core (plus whatever else runs)
    assert 1 <= auto_threads(0.1, samples=2, gap_s=0.1) <= (os.cpu_count() or 1)


@pytest.mark.parametrize("spec", ["./no-such-folder", "../models/missing", "a/b/c", "~/no-such-model-folder"])
def test_a_missing_path_is_not_found_not_a_bad_hub_id(spec, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AtlasError) as info:
        load_model(spec)
    message = str(info.value)
    assert message.startswith(f"{spec}: model not found") and "Repo id" not in message and "\n" not in message


def _no_proxy(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_hub_id_offline_fails_at_once_in_one_line(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.monotonic()
    with pytest.raises(AtlasError) as info:
        load_model("some-org/some-model")
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert elapsed < 5, elapsed
    assert "\n" not in message and "not in the Hugging Face cache" in message
    assert "unset both to download it" in message  # how to go online
    assert "Retrying" not in capfd.readouterr().err


def test_hub_id_with_the_hub_unreachable_fails_at_once_in_one_line(monkeypatch, tmp_path, capfd):
    # a local port nobody listens on: the connection is refused at once, as on a machine without network
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    _no_proxy(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.monotonic()
    with pytest.raises(AtlasError) as info:
        load_model("some-org/some-model")
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert elapsed < 10, elapsed  # the hub client alone retries five times with back-off (~30 s)
    assert "\n" not in message and f"127.0.0.1:{port} cannot be reached" in message
    assert "connect to the network" in message
    assert "Retrying" not in capfd.readouterr().err


def test_a_cached_hub_model_loads_offline(monkeypatch, tmp_path):
    """Offline mode still finds a hub id that is in the cache (the layout huggingface_hub writes)."""
    lm = tiny_model("qwen2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2"
    snapshot = repo / "snapshots" / commit
    lm.model.save_pretrained(snapshot)
    lm.tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("tiny-org/tiny-qwen2")
    assert loaded.model_id == "tiny-org/tiny-qwen2" and loaded.revision == commit
    x = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x).logits, lm.model(x).logits, atol=1e-6)


class _RunsCode:
    """Unpickling this runs code: it writes `marker` (a stand-in for anything an attacker would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_malicious_pickle_checkpoint_is_refused_in_one_line_and_never_runs(tmp_path):
    lm = tiny_model("llama")
    folder = tmp_path / "model"
    lm.model.config.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    marker = tmp_path / "code-ran.txt"
    torch.save({**state, "lm_head.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    # control: the same payload in a copy does run code when unpickled unsafely
    control_marker = tmp_path / "control-ran.txt"
    torch.save({"x": _RunsCode(control_marker)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control_marker.read_text() == "ran"

    with pytest.raises(AtlasError) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message
    assert str(folder / "pytorch_model.bin") in message and "safetensors" in message
    assert not marker.exists()
    # a weights-only pickle of the same model still loads
    torch.save(state, folder / "pytorch_model.bin")
    loaded = load_model(folder)
    x = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x).logits, lm.model(x).logits, atol=1e-5)  # SDPA vs eager
    assert not marker.exists()
