"""The shared loader: local folders of every test architecture, chat-template errors, the default model."""

from __future__ import annotations

import os
import time

import pytest
import torch

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


def test_missing_chat_template_is_a_clear_error(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path)
    tok = lm.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        tok.save_pretrained(tmp_path)
    finally:
        tok.chat_template = template
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(AtlasError, match="no chat template"):
        load_model(tmp_path)
    # ... unless the caller supplies one
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
