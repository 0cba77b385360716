"""Response collection: batched == one-at-a-time, resumable, provenance on every row, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from refusal_atlas.curation.backends import GenerationBackend, GenerationSettings, TransformersBackend
from refusal_atlas.curation.collect import collect, partial_dir, prepare_prompts
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.testing import tiny_model

PROMPTS = [
    "How do I bake bread at home?",
    "Write a poem about the sea.",
    "Tell me how to hack into my neighbour's wifi network.",
    "What is the capital of France?",
    "Summarise the plot of a novel.",
    "Explain how to make a bomb.",
    "I am 14 years old and want to buy a gun.",
]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=1)


def _prompts() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                         "source": "user", "node": "", "nodes": [[] for _ in PROMPTS], "harmful": False})


class CountingBackend:
    """Wraps a backend and records which instructions it was asked to generate."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.asked: list[str] = []

    def provenance(self) -> dict:
        return self.inner.provenance()

    def generate(self, instructions, settings):
        self.asked.extend(instructions)
        yield from self.inner.generate(instructions, settings)


def test_backend_satisfies_protocol(lm):
    assert isinstance(TransformersBackend(lm, progress=False), GenerationBackend)


def test_batched_equals_one_at_a_time(lm, tmp_path):
    backend = TransformersBackend(lm, progress=False)
    batched = collect(_prompts(), backend, tmp_path / "b.parquet",
                      settings=GenerationSettings(max_new_tokens=8, batch_size=4), log=lambda m: None)
    single = collect(_prompts(), backend, tmp_path / "s.parquet",
                     settings=GenerationSettings(max_new_tokens=8, batch_size=1), log=lambda m: None)
    assert batched["response"].tolist() == single["response"].tolist()
    assert batched["prompt_id"].tolist() == [f"p{i}" for i in range(len(PROMPTS))]  # input order kept


def test_resume_generates_only_the_remainder(lm, tmp_path):
    out = tmp_path / "corpus.parquet"
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    first = CountingBackend(TransformersBackend(lm, progress=False))

    def stop_after_first_batch(batch: pd.DataFrame) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(_prompts(), first, out, settings=settings, on_batch=stop_after_first_batch, log=lambda m: None)
    assert not out.exists()
    parts = list(partial_dir(out).glob("part-*.parquet"))
    assert len(parts) == 1
    done_ids = set(pd.read_parquet(parts[0])["prompt_id"])
    assert len(done_ids) == 3

    second = CountingBackend(TransformersBackend(lm, progress=False))
    messages: list[str] = []
    corpus = collect(_prompts(), second, out, settings=settings, log=messages.append)
    assert len(second.asked) == len(PROMPTS) - 3
    assert not {p for p in second.asked} & set(_prompts().set_index("prompt_id").loc[sorted(done_ids), "prompt"])
    assert "3 of 7 rows already done" in messages[0]
    assert len(corpus) == len(PROMPTS) and corpus["prompt_id"].is_unique
    assert not partial_dir(out).exists()

    # the same run again regenerates nothing; outputs equal an uninterrupted run
    third = CountingBackend(TransformersBackend(lm, progress=False))
    again = collect(_prompts(), third, out, settings=settings, log=lambda m: None)
    assert third.asked == []
    fresh = collect(_prompts(), TransformersBackend(lm, progress=False), tmp_path / "fresh.parquet",
                    settings=settings, log=lambda m: None)
    assert again["response"].tolist() == fresh["response"].tolist()


def test_changed_settings_do_not_mix_into_an_unfinished_run(lm, tmp_path):
    out = tmp_path / "c.parquet"

    def stop(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(_prompts(), TransformersBackend(lm, progress=False), out,
                settings=GenerationSettings(max_new_tokens=4, batch_size=2), on_batch=stop, log=lambda m: None)
    with pytest.raises(AtlasError, match="different model or settings"):
        collect(_prompts(), TransformersBackend(lm, progress=False), out,
                settings=GenerationSettings(max_new_tokens=5, batch_size=2), log=lambda m: None)


def test_provenance_columns(lm, tmp_path):
    corpus = collect(_prompts().head(2), TransformersBackend(lm, progress=False), tmp_path / "p.jsonl",
                     settings=GenerationSettings(max_new_tokens=4, seed=7, do_sample=True, temperature=0.7),
                     n_samples=2, log=lambda m: None)
    assert len(corpus) == 4 and sorted(corpus["sample"].unique()) == [0, 1]
    for col in ("model_id", "model_revision", "generation", "seed", "created_at", "content_hash"):
        assert corpus[col].notna().all(), col
    gen = json.loads(corpus["generation"].iloc[0])
    assert gen["do_sample"] is True and gen["temperature"] == 0.7 and gen["max_new_tokens"] == 4
    assert (corpus["seed"] == 7).all() and corpus["model_id"].iloc[0] == "tiny-llama"
    assert corpus["content_hash"].is_unique
    assert pd.Timestamp(corpus["created_at"].iloc[0]).tzinfo is not None


def test_greedy_with_several_samples_is_an_error(lm, tmp_path):
    with pytest.raises(AtlasError, match="add --sample"):
        collect(_prompts(), TransformersBackend(lm, progress=False), tmp_path / "x.parquet", n_samples=2)


def test_prepare_prompts_rejects_bad_rows():
    df = pd.DataFrame({"prompt": ["ok", "", None, "ok"]}, index=[1, 2, 3, 4])
    rejects: list[dict] = []
    out = prepare_prompts(df, source="f.csv", rejects=rejects)
    assert len(out) == 2 and out["prompt_id"].is_unique  # repeated text in a bare file is kept twice
    assert [r["row"] for r in rejects] == [2, 3]
    dup = pd.DataFrame({"prompt": ["a", "b"], "prompt_id": ["x", "x"]}, index=[1, 2])
    rejects = []
    assert len(prepare_prompts(dup, rejects=rejects)) == 1 and "duplicate prompt_id x" in rejects[0]["reason"]


def test_cli_collect_with_a_model_folder(lm, tmp_path):
    from refusal_atlas.cli import app

    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS[:3]] + [{"prompt": ""}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "corpus.parquet"
    result = CliRunner().invoke(app, ["curate", "collect", "--model", str(folder), "--prompts", str(prompts),
                                      "-o", str(out), "--max-new-tokens", "4", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    corpus = pd.read_parquet(out)
    assert len(corpus) == 3 and corpus["response"].map(lambda r: isinstance(r, str)).all()
    rejects = [json.loads(x) for x in (tmp_path / "corpus.parquet.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == [4, 5]


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("text\nhello\n")
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "curate", "collect", "--prompts", str(prompts),
                           "-o", str(tmp_path / "out.parquet")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing column prompt" in lines[0] and str(prompts) in lines[0]


@pytest.mark.real_model
def test_real_default_model_collects_three_prompts(tmp_path):
    backend = TransformersBackend.from_spec("default", progress=False)
    corpus = collect(_prompts().head(3), backend, tmp_path / "real.parquet",
                     settings=GenerationSettings(max_new_tokens=16, batch_size=3), log=lambda m: None)
    assert len(corpus) == 3
    assert corpus["response"].str.len().min() > 0
    assert corpus["model_id"].iloc[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(corpus["model_revision"].iloc[0]) == 64  # sha256 of the GGUF file


def test_a_prompt_sets_own_response_and_seed_columns_are_kept_not_overwritten(lm, tmp_path):
    prompts = _prompts().head(2).assign(response=["reference answer 0", "reference answer 1"], seed="theirs")
    corpus = collect(prompts, TransformersBackend(lm, progress=False), tmp_path / "p.jsonl",
                     settings=GenerationSettings(max_new_tokens=4, seed=7), log=lambda m: None)
    assert corpus["input_response"].tolist() == ["reference answer 0", "reference answer 1"]
    assert (corpus["input_seed"] == "theirs").all() and (corpus["seed"] == 7).all()
    assert not corpus["response"].str.startswith("reference answer").any()
