"""`refusal-atlas sae train | info` through the real CLI app."""

from __future__ import annotations

from pathlib import Path

import typer
from tests.mechinterp.sae.synthetic import recovered, write_planted
from typer.testing import CliRunner

from refusal_atlas.cli import sae as sae_cli
from refusal_atlas.mechinterp.sae import load_sae

app = typer.Typer()
app.add_typer(sae_cli.app, name="sae")


def test_train_and_info(tmp_path: Path) -> None:
    dictionary = write_planted(tmp_path / "acts.safetensors", n=20_000)
    runner = CliRunner()
    result = runner.invoke(app, ["sae", "train", str(tmp_path / "acts.safetensors"), "-o", str(tmp_path / "sae"),
                                 "--width", "256", "--k", "6", "--epochs", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "FVU" in result.output
    assert recovered(load_sae(tmp_path / "sae").W_dec, dictionary) >= 0.9
    result = runner.invoke(app, ["sae", "info", str(tmp_path / "sae")])
    assert result.exit_code == 0 and "topk SAE: d_in 64, d_sae 256, k 6" in result.output


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    from refusal_atlas.errors import AtlasError

    result = CliRunner().invoke(app, ["sae", "train", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o")])
    assert isinstance(result.exception, AtlasError) and "no such activations" in str(result.exception)


def test_features_command_escapes_text(tmp_path: Path) -> None:
    import pandas as pd

    (tmp_path / "sae").mkdir()
    pd.DataFrame([{"node": "weapons", "rank": 1, "feature": 12, "decoder_cosine": 0.5, "attribution": 1.5,
                   "mean_act_node": 2.0, "mean_act_harmless": 0.1, "top_contexts": ["[bold red]x[/bold red] ⟦bomb⟧"],
                   "promoted_tokens": ["I", " cannot"]}]).to_parquet(tmp_path / "sae" / "features.parquet")
    result = CliRunner().invoke(app, ["sae", "features", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "[bold red]x[/bold red]" in result.output  # markup in the data is shown as text, not applied
    result = CliRunner().invoke(app, ["sae", "features", str(tmp_path), "--node", "cyber"])
    assert "no node 'cyber'" in str(result.exception)
