"""`python -m nli_grpo.evaluate` on the tiny model: zero-shot and adapter evaluations as cell jobs,
the adapter's own base, refusals before anything is loaded, and the scoring mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nli_grpo import results
from nli_grpo.evaluate import main
from nli_grpo.layout import RESULT_FILENAME


@pytest.mark.slow
def test_command_line_zero_shot_and_adapter(tmp_path):
    from peft import get_peft_model

    from nli_grpo.config import LoraConfig, ModelConfig
    from nli_grpo.models import load_base_model, peft_lora_config

    common = ["--base", "tiny", "--config", "smoke", "--backend", "hf", "--limit", "2", "--benchmarks", "anli_r1,hans_subsequence"]
    assert main([*common, "--out", str(tmp_path / "zs")]) == 0
    doc = results.read_result(tmp_path / "zs" / RESULT_FILENAME)
    assert doc["status"] == "complete" and doc["cell"]["stage"] == "zero_shot" and doc["cell"]["lora_rank"] is None
    assert doc["model"]["key"] == "tiny" and doc["model"]["revision"] is None  # recorded for evaluations too
    assert sorted(doc["eval"]) == ["anli_r1", "hans_subsequence"] and doc["train"] is None

    adapter = tmp_path / "adapter"
    get_peft_model(load_base_model(ModelConfig(name_or_path="tiny"), torch.float32),
                   peft_lora_config(LoraConfig(rank=4))).save_pretrained(adapter)
    assert main([*common, "--adapter", str(adapter), "--out", str(tmp_path / "ad")]) == 0
    doc = results.read_result(tmp_path / "ad" / RESULT_FILENAME)
    assert doc["status"] == "complete" and doc["cell"]["lora_rank"] == 4 and doc["adapter"] == str(adapter.resolve())
    assert json.loads((tmp_path / "ad" / RESULT_FILENAME).read_text())["eval"]["anli_r1"]["n"] == 2
    assert main([*common, "--adapter", str(tmp_path)]) == 2  # not an adapter folder: refused


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused_before_any_model_is_loaded(tmp_path, capsys, limit):
    assert main(["--base", "tiny", "--config", "smoke", "--limit", limit, "--out", str(tmp_path / "x")]) == 2
    assert f"eval.limit={limit} must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_lists_both_modes():
    text = subprocess.run([sys.executable, "-m", "nli_grpo.evaluate", "--help"], capture_output=True, text=True).stdout
    for option in ("--base", "--adapter", "--limit", "--score", "--benchmark", "--force", "--out"):
        assert option in text, option


def test_score_mode_takes_no_model_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--score", str(tmp_path / "x.jsonl"), "--benchmark", "snli", "--base", "tiny"])
    assert exit_.value.code == 2 and "takes no --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--score", str(tmp_path / "x.jsonl")])
    assert "--score needs --benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_an_adapter_is_evaluated_on_its_own_base_and_overrides_go_anywhere(tmp_path):
    """No --base: the base is the one the adapter names (here the tiny stand-in), not the
    recipe's (paper: a 7B AWQ checkpoint); key=value overrides on both sides of the options."""
    from peft import get_peft_model

    from nli_grpo.catalog import adapter_base_model
    from nli_grpo.config import LoraConfig, ModelConfig
    from nli_grpo.models import load_base_model, peft_lora_config

    adapter = tmp_path / "adapter"
    get_peft_model(load_base_model(ModelConfig(name_or_path="tiny"), torch.float32),
                   peft_lora_config(LoraConfig(rank=4))).save_pretrained(adapter)
    assert adapter_base_model(adapter) == "tiny"
    out = tmp_path / "ad"
    assert main(["--config", "paper", "data.local_dir=samples", "--adapter", str(adapter), "--backend", "hf",
                 "--limit", "1", "--benchmarks", "anli_r1", "data.hub=false", "--out", str(out), "eval.max_new_tokens=4"]) == 0
    doc = results.read_result(out / RESULT_FILENAME)
    assert doc["cell"]["model"] == "tiny" and doc["cell"]["quantization"] == "bf16" and doc["cell"]["lora_rank"] == 4
    assert doc["config"]["eval"]["max_new_tokens"] == 4 and doc["eval"]["anli_r1"]["n"] == 1
    # another adapter into the same folder would mix two models' predictions: refused, then --force
    other = tmp_path / "other"
    get_peft_model(load_base_model(ModelConfig(name_or_path="tiny"), torch.float32),
                   peft_lora_config(LoraConfig(rank=4))).save_pretrained(other)
    common = ["--config", "paper", "data.local_dir=samples", "data.hub=false", "--backend", "hf", "--limit", "1",
              "--benchmarks", "anli_r1", "--out", str(out), "eval.max_new_tokens=4"]
    assert main([*common, "--adapter", str(other)]) == 2
    assert main([*common, "--adapter", str(other), "--force"]) == 0
    assert results.read_result(out / RESULT_FILENAME)["adapter"] == str(other.resolve())
    assert len(list((tmp_path / ".replaced").iterdir())) == 1
