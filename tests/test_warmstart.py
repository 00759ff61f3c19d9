"""The warm-started tiny model (`tiny-sft`, nli_grpo.warmstart): its SFT data teaches exactly the
format the package's own parser, format check and reward accept, and the catalogue treats it as
a stand-in (nothing to download or prepare)."""

import json

from nli_grpo.catalog import STAND_IN_FILENAME, adapter_base_model, model_key, model_shape, stand_in_shape
from nli_grpo.data import load_train_source
from nli_grpo.prompts import LABELS, build_messages, extract_label, format_ok
from nli_grpo.rewards import nli_reward, nli_reward_one
from nli_grpo.warmstart import first_sentence, sft_records, sft_target


def test_every_target_is_well_formed_and_earns_the_full_reward():
    for label in range(len(LABELS)):
        target = sft_target(label)
        assert format_ok(target) and extract_label(target) == label
        assert nli_reward_one(target, label) == 1.0
        assert [nli_reward_one(target, other) for other in range(len(LABELS)) if other != label] == [0.1, 0.1]


def test_the_sft_data_is_the_shipped_training_sample_in_the_papers_prompt():
    rows = load_train_source("anli_train_r1", local_dir="samples", hub=False).dataset
    records = sft_records()
    assert len(records) == 2 * len(rows) == 96  # every row, then every row with a one-sentence premise
    pairs = list(zip(rows["premise"], rows["hypothesis"]))
    assert [r["prompt"] for r in records] == [build_messages(p, h) for p, h in pairs] + [
        build_messages(first_sentence(p), h) for p, h in pairs]
    # as TRL hands the completions to the reward function (conversational: the assistant message)
    assert nli_reward([r["completion"] for r in records], list(rows["label"]) * 2) == [1.0] * 96
    assert sorted({r["completion"][0]["role"] for r in records}) == ["assistant"]


def test_first_sentence():
    assert first_sentence("Ann (born 1.5.1985) sings. She won in 2014.") == "Ann (born 1.5.1985) sings."
    assert first_sentence("Is it? Yes.") == "Is it?"
    assert first_sentence("  No sentence end  ") == "No sentence end"


def test_tiny_sft_is_a_stand_in_of_the_tiny_shape(tmp_path):
    assert stand_in_shape("tiny-sft") == "tiny-sft" and model_key("tiny-sft") == "tiny-sft"
    assert model_shape("tiny-sft") == model_shape("tiny")
    # an adapter trained on it names its base by the stand-in name, not by its cache folder
    base = tmp_path / "tiny-sft-v2.1"
    base.mkdir()
    (base / STAND_IN_FILENAME).write_text(json.dumps({"name": "tiny-sft", "random_weights": False}))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    assert adapter_base_model(tmp_path / "adapter") == "tiny-sft"
