"""What several test modules share: the Slurm cluster fixture, the sweep files, result documents
as jobs write them, and the reward functions of the CPU training tests. Test modules import
nothing from each other; they ask for these fixtures."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test session gets a cache of its own ($NLI_GRPO_CACHE: stand-in models, prepared data,
    the lock file), inherited by the jobs and commands tests start: what a developer prepared in
    theirs cannot change a test's outcome. The tiny model is built once per session (~1 s)."""
    cache = tmp_path_factory.mktemp("nli_grpo_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NLI_GRPO_CACHE", str(cache))
        patch.delenv("HF_HUB_CACHE", raising=False)
        yield cache


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: needs the local Slurm cluster (bash slurm/local-cluster.sh up); skipped when it is down"
    )


def _slurm_problem():
    """Why the Slurm cluster cannot be used, or None when it answers."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "`scontrol ping` did not answer within 10 s"
    if "is UP" not in ping.stdout:
        first_line = (ping.stdout + ping.stderr).strip().splitlines()[:1]  # then comes a banner of stars
        return f"slurmctld is not up (`scontrol ping`: {' '.join(first_line)})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm cluster. Skips when there is none, fails instead when NLI_GRPO_REQUIRE_SLURM=1
    (CI), so that a broken cluster cannot pass as an all-skipped run."""
    problem = _slurm_problem()
    if problem:
        message = f"Slurm cluster not usable: {problem}. Start one with `bash slurm/local-cluster.sh up` (as root)."
        if os.environ.get("NLI_GRPO_REQUIRE_SLURM") == "1":
            pytest.fail(message + " NLI_GRPO_REQUIRE_SLURM=1 is set, so this is an error.", pytrace=False)
        pytest.skip(message)


# --------------------------------------------------------------------------- sweeps and results
@pytest.fixture(scope="session")
def load_sweep():
    """`load_sweep("lora_rank")`: the SWEEP declared in sweeps/lora_rank.py."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"sweep_{name}", REPO / "sweeps" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SWEEP
    return load


@pytest.fixture(scope="session")
def write_result():
    """`write_result(run_dir, status, steps=12, attempts=1, error=None)`: the result.json of a smoke
    cell of 12 steps as its job writes it (nli_grpo.layout.result_document), training at `steps`."""
    from nli_grpo import results
    from nli_grpo.job import config_for_run
    from nli_grpo.layout import CellFolder, result_document

    def write(run_dir: Path, status: str, steps: int = 12, attempts: int = 1, error: str | None = None) -> dict:
        cfg = config_for_run("smoke", ["output.sweep=" + Path(run_dir).parent.name, "grpo.max_steps=12"], str(run_dir))
        cfg.output.cell_id = Path(run_dir).name
        doc = result_document(cfg, status=status, slurm={"attempts": attempts}, train={"steps_done": steps},
                              error=error, updated_at="2026-11-21T10:00:00+00:00")
        results.atomic_write_json(CellFolder(run_dir).result, doc)
        return doc
    return write


# --------------------------------------------------------------------------- rewards of the CPU training tests
def alternating(completions, **_):
    """0, 1, 0, 1 ...: non-zero advantages in every group, so every update runs backward (the
    paper's reward is 0 for everything a random model says, and such updates are skipped)."""
    return [float(i % 2) for i in range(len(completions))]


# Targets of the learning-signal reward: ~12% of the tiny tokenizer's vocabulary.
TARGET_TOKENS = set(range(3, 60))


def target_token_share(completions, completion_ids, **_):
    """Share of completion tokens in TARGET_TOKENS: a random policy collects ~0.1 to 0.2; only a
    policy that learned from the reward collects much more."""
    return [sum(t in TARGET_TOKENS for t in ids) / max(1, len(ids)) for ids in completion_ids]


@pytest.fixture(scope="session")
def rewards():
    """Reward functions for training the tiny model: `alternating` (signal in every group) and
    `target_token_share` (what only a policy that learned collects)."""
    return SimpleNamespace(alternating=alternating, target_token_share=target_token_share)


@pytest.fixture(scope="session")
def learning_task():
    """The learning-signal task: settings under which GRPO visibly raises `target_token_share`
    within 40 steps on the random tiny model (the first fifth of the steps warms the lr up from 0,
    so it measures the untrained policy). Random weights, not the smoke recipe's warm-started
    model: their samples spread over the vocabulary, so a few updates visibly move them."""
    overrides = [
        "model.name_or_path=tiny",
        "grpo.max_steps=40", "grpo.num_generations=8", "grpo.completions_per_step=16", "grpo.num_iterations=1",
        "grpo.beta=0.0", "grpo.learning_rate=0.02", "grpo.warmup_steps=8", "grpo.lr_scheduler_type=constant_with_warmup",
        "grpo.max_completion_length=8", "grpo.temperature=1.0", "grpo.top_k=0", "grpo.save_steps=1000",
        "eval.after_training=false", "lora.rank=16",
    ]
    return SimpleNamespace(overrides=overrides, reward=target_token_share)


# --------------------------------------------------------------------------- the datasets' original files
def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(line) for line in [header, *rows]) + "\n")


def _jsonl(path: Path, rows: list[dict]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_original_files(folder: Path) -> Path:
    """A few rows of each set in the format its authors distributed (columns, label spellings,
    file names and folders as in the releases), with quotes and a no-gold row where the real
    files have them. Returns the folder."""
    # HANS: github.com/tommccoy1/hans, heuristics_evaluation_set.txt (tab-separated, no quoting)
    hans_header = ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                   "sentence1", "sentence2", "pairID", "heuristic", "subcase", "template"]
    hans = [("non-entailment", "The president advised the doctor .", "The doctor advised the president .", "ex0",
             "lexical_overlap", "ln_subject/object_swap", "temp1"),
            ("entailment", "The doctor near the actor danced .", "The doctor danced .", "ex1",
             "lexical_overlap", "le_around_prepositional_phrase", "temp27"),
            ("non-entailment", "The manager knew the athlete mentioned the actor .", "The manager knew the athlete .", "ex2",
             "subsequence", "sn_NP/S", "temp43"),
            ("entailment", "Certainly the lawyers resigned .", "The lawyers resigned .", "ex3",
             "constituent", "ce_adverb", "temp60"),
            ("non-entailment", 'If the "artist" slept , the actor ran .', "The artist slept .", "ex4",
             "constituent", "cn_embedded_under_if", "temp58")]
    _tsv(folder / "hans" / "heuristics_evaluation_set.txt", hans_header,
         [[gold, "( x )", "( x )", "(ROOT x)", "(ROOT x)", s1, s2, pid, heur, sub, tpl] for gold, s1, s2, pid, heur, sub, tpl in hans])
    # ANLI v1.0: anli_v1.0/R{1,2,3}/{train,dev,test}.jsonl, labels as letters
    for k in (1, 2, 3):
        for split in ("train", "dev", "test"):
            _jsonl(folder / "anli_v1.0" / f"R{k}" / f"{split}.jsonl", [
                {"uid": f"{split}-r{k}-{i}", "premise": f"Round {k} premise {i}.", "hypothesis": f"Hypothesis {i}.",
                 "label": label, "reason": "", "model_label": "n", "emturk": False, "genre": "wiki", "tag": ""}
                for i, label in enumerate("enc")])
    # SNLI 1.0 and MultiNLI 1.0: gold_label strings, "-" = no gold (no majority among the annotators)
    common = {"sentence1_binary_parse": "( x )", "sentence1_parse": "(ROOT x)", "sentence2_binary_parse": "( x )",
              "sentence2_parse": "(ROOT x)"}
    _jsonl(folder / "snli_1.0" / "snli_1.0_test.jsonl", [
        {"annotator_labels": ["neutral"], "captionID": "1.jpg#0", "gold_label": gold, "pairID": f"1.jpg#0r1{g}",
         "sentence1": "Two women are embracing.", "sentence2": f"Hypothesis {g}.", **common}
        for gold, g in (("neutral", "n"), ("entailment", "e"), ("-", "x"), ("contradiction", "c"))])
    _jsonl(folder / "multinli_1.0" / "multinli_1.0_dev_mismatched.jsonl", [
        {"annotator_labels": [gold], "genre": "letters", "gold_label": gold, "pairID": f"{i}e", "promptID": str(i),
         "sentence1": f"Mismatched premise {i}.", "sentence2": "A hypothesis.", **common}
        for i, gold in enumerate(("contradiction", "neutral", "entailment"))])
    # GLUE diagnostic, the labelled release (diagnostic-full.tsv): coarse categories as columns
    _tsv(folder / "glue" / "diagnostic-full.tsv",
         ["Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge", "Domain", "Premise", "Hypothesis", "Label"],
         [["Negation", "", "Negation", "", "Artificial", "The cat sat on the mat.", "The cat did not sit on the mat.", "contradiction"],
          ["", "Active/Passive", "", "", "News", "The dog chased the ball.", "The ball was chased by the dog.", "entailment"],
          ["", "", "", "World knowledge", "Wikipedia", "Paris is in France.", "Paris is in Europe.", "entailment"],
          ["Lexical entailment", "", "", "Common sense", "Reddit", "He ate an apple.", "He ate fruit.", "neutral"]])
    # Counter-NLI (Kaushik et al. 2020): NLI/revised_combined/test.tsv
    _tsv(folder / "counterfactually-augmented-data" / "NLI" / "revised_combined" / "test.tsv",
         ["sentence1", "sentence2", "gold_label"],
         [["A woman is walking her dog in the snow.", "A woman is inside with her pet.", "contradiction"],
          ["A woman is walking her dog in a mall.", "A woman is inside with her pet.", "entailment"]])
    return folder


@pytest.fixture
def original_files(tmp_path):
    """A folder with a few rows of every set as its authors distributed them (see write_original_files)."""
    return write_original_files(tmp_path / "originals")


@pytest.fixture(scope="session")
def hf_greedy_tokens():
    """`f(model, tokenizer, prompt_ids, max_new_tokens)`: HF `generate`'s greedy completion token
    ids per prompt, cut after the first EOS as vLLM returns them (HF pads after an early EOS;
    vLLM stops at it and keeps it). What the vLLM equivalence tests compare with."""
    return _hf_greedy_tokens


def _hf_greedy_tokens(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch

    tokens = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            tokens.append(out[0, len(ids):].tolist())
    return [t[: t.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in t else t for t in tokens]
