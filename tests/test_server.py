"""Rollouts from a vLLM server in the job's own allocation (`rollout.backend: vllm_server`): the
server's command line and GPU split, the schedule of prompts generated ahead (checked against
TRL's sampler and accelerate's sharding), and, for real on vLLM's CPU build as the server on
loopback, training that learns through it, on-policy and one version ahead, and greedy tokens
equal to HF generate with the same adapter.

The slow tests share one server (~35 s to start here); each trainer names its adapter versions
apart, as two jobs' trainers would."""

from __future__ import annotations

import stat
import threading

import pytest
import torch

from nli_grpo import results, server
from nli_grpo.job import config_for_run
from nli_grpo.layout import CellFolder
from nli_grpo.process import StopRequest
from nli_grpo.prompts import render_prompt

PAIRS = [
    ("A man is playing a guitar on stage.", "A man is performing music."),
    ("Two dogs run across the field.", "The animals are asleep."),
    ("The woman is reading a book in the park.", "Someone is outdoors."),
]


# --------------------------------------------------------------------------- the server process
def test_the_server_serves_adapters_up_to_the_rank_with_room_for_every_version_in_flight():
    cfg = config_for_run("paper", ["rollout.backend=vllm_server", "resources.gpus_per_node=3", "rollout.max_staleness=2", "lora.rank=48"])
    command = server.server_command(cfg, "/models/qwen", 8000, ["0", "1"])
    joined = " ".join(command)
    assert "--enable-lora --max-lora-rank 64 --max-loras 4" in joined  # rank 48 -> vLLM's 64; k + 2 versions
    assert "--tensor-parallel-size 2" in joined and "--dtype float16" in joined and "--seed 0" in joined
    assert "--gpu-memory-utilization 0.85" in joined  # the evaluation engine's share: the GPUs are its own
    # the loss of the paper recipe reads log-probs at temperature 1: the server reports the model's own
    assert command[command.index("--logprobs-mode") + 1] == "raw_logprobs"
    at_sampling = config_for_run("paper", ["rollout.backend=vllm_server", "resources.gpus_per_node=3", "grpo.loss_temperature=null"])
    assert "processed_logprobs" in server.server_command(at_sampling, "/m", 1, ["0"])
    assert "--max-num-batched-tokens" not in command


def test_on_the_cpu_no_prefill_is_split_over_steps():
    """vLLM's CPU backend fails on a seeded request whose prefill is split (chunked prefill):
    the step budget holds every sequence in flight, max_staleness + 1 batches of them."""
    cfg = config_for_run("smoke", ["rollout.backend=vllm_server", "rollout.max_staleness=1"])
    command = server.server_command(cfg, "/m", 1, [])
    max_len = int(command[command.index("--max-model-len") + 1])
    budget = int(command[command.index("--max-num-batched-tokens") + 1])
    assert budget >= max_len * cfg.grpo.completions_per_step * 2
    assert int(command[command.index("--kv-cache-memory-bytes") + 1]) > 0  # sized from the need, not a host share


def test_the_server_takes_the_first_gpus_and_training_the_rest():
    cfg = config_for_run("paper", ["rollout.backend=vllm_server", "resources.gpus_per_node=3"])
    assert server.split_devices(cfg, ["4", "5", "6"]) == (["4"], ["5", "6"])
    assert server.split_devices(cfg, []) == ([], [])
    with pytest.raises(ValueError, match="leaves no GPU for training out of the 1 visible"):
        server.split_devices(cfg, ["0"])


def _fake_nvidia_smi(folder, gpus: int) -> str:
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(folder)


def test_visible_gpus_are_the_ones_present_narrowed_by_cuda_visible_devices(tmp_path, monkeypatch):
    """nvidia-smi cannot run on this machine: a script prints what it prints on a 4-GPU node."""
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, 4))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert server.visible_devices() == ["0", "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert server.visible_devices() == ["2", "3"]
    # a node without GPUs (a test cluster's GRES names fake ones): none, whatever Slurm set
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert server.visible_devices() == []


def test_no_server_for_other_backends_and_none_started_by_torchrun_ranks(tmp_path, monkeypatch):
    monkeypatch.delenv(server.URL_ENV, raising=False)
    with server.serving(config_for_run("smoke", ["rollout.backend=vllm"]), tmp_path) as env:
        assert env == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="under torchrun needs the server started before the ranks"):
        with server.serving(config_for_run("smoke", ["rollout.backend=vllm_server"]), tmp_path):
            pass
    monkeypatch.setenv(server.URL_ENV, "http://127.0.0.1:1")  # the job gave one
    with server.serving(config_for_run("smoke", ["rollout.backend=vllm_server"]), tmp_path) as env:
        assert env == {}


# --------------------------------------------------------------------------- the schedule read ahead
def test_the_lookahead_sampler_yields_trls_order_epoch_after_epoch_even_when_read_ahead():
    from trl.trainer.utils import RepeatSampler

    from nli_grpo.rollout import LookaheadSampler

    def repeat_sampler():
        return RepeatSampler(list(range(23)), mini_repeat_count=4, batch_size=3, repeat_count=2, shuffle=True, seed=7)
    trl, ours = repeat_sampler(), LookaheadSampler(repeat_sampler())
    ours.chunks(2)  # the generating thread reads two epochs ahead before the loader starts the first
    for _ in range(3):
        assert list(ours) == list(trl)


@pytest.mark.parametrize("ranks, steps_per_generation, per_device", [(1, 1, 4), (2, 1, 6), (2, 2, 4), (3, 2, 2)])
def test_the_schedule_gives_each_rank_the_rows_accelerate_hands_it(ranks, steps_per_generation, per_device):
    """TRL's loader: batches of per_device x steps_per_generation rows from RepeatSampler, rank r
    getting every ranks-th batch (accelerate's BatchSamplerShard); the first of each repeat is
    generated for. With 2 ranks of 6 rows a group of 4 spans both."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from trl.trainer.utils import RepeatSampler

    from nli_grpo.rollout import LookaheadSampler, PromptSchedule

    num_generations, iterations = 4, 2
    rows = per_device * steps_per_generation
    prompts_per_batch = rows * ranks // num_generations
    kwargs = dict(mini_repeat_count=num_generations, batch_size=prompts_per_batch,
                  repeat_count=iterations * steps_per_generation, shuffle=True, seed=3)
    ids = [f"row-{i}" for i in range(40)]
    sampler = LookaheadSampler(RepeatSampler(ids, **kwargs))
    for rank in range(ranks):
        loader = list(BatchSamplerShard(BatchSampler(RepeatSampler(ids, **kwargs), rows, drop_last=False), ranks, rank))
        generated_for = loader[::iterations * steps_per_generation]
        schedule = PromptSchedule(sampler, ids, rows, rank)
        assert [schedule.rows(p) for p in range(len(generated_for))] == generated_for
        assert schedule.locate([ids[i] for i in generated_for[2]], expected=None) == 2


class _RecordingClient:
    """Stands in for the server's HTTP API in the scheduling test: records which version each
    batch was generated from (the real server serves the slow tests below)."""

    def __init__(self):
        self.calls = []

    def generate(self, model, prompt_ids, seeds):
        self.calls.append(model)
        return [[1]] * len(prompt_ids), [[-0.5]] * len(prompt_ids)


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_batches_generated_ahead_are_never_more_than_max_staleness_versions_behind(max_staleness):
    from types import SimpleNamespace

    from nli_grpo.rollout import AheadGenerator

    versions = SimpleNamespace(latest=-1, name=lambda v: f"v{v}")
    schedule = SimpleNamespace(rows=lambda p: [p, p], rank=0)
    ahead = AheadGenerator(_RecordingClient(), versions, schedule, lambda rows: [[r] for r in rows], max_staleness, seed=0)
    try:
        taken = []
        for version in range(8):
            versions.latest = version  # published by the trainer, then it takes its batch
            batch = ahead.take(10 + version, version)
            taken.append(version - batch.version)
            threading.Event().wait(0.05)  # the trainer trains: the thread generates ahead meanwhile
        assert taken[0] == 0 and max(taken) == max_staleness and taken[-1] == max_staleness
        # a batch that is not the one expected next (a resume mid-way): generated from the current version
        versions.latest = 8
        assert ahead.take(50, 8).version == 8
    finally:
        ahead.close()


# --------------------------------------------------------------------------- for real, on vLLM's CPU build
@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, learning_task):
    """One server for the module, as a job starts it: on the learning task's model and settings,
    with room for versions one batch ahead."""
    folder = tmp_path_factory.mktemp("server")
    cfg = config_for_run("smoke", [*learning_task.overrides, "rollout.backend=vllm_server", "rollout.max_staleness=1"], str(folder))
    with server.serving(cfg, folder) as env:
        yield env[server.URL_ENV]
    assert not any(p.is_running() for p in _server_processes(folder))


def _server_processes(folder):
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "vllm.entrypoints" in " ".join(p.info["cmdline"] or [])]


def _train(vllm_server, out, overrides, reward, monkeypatch):
    from nli_grpo.training import build_trainer

    monkeypatch.setenv(server.URL_ENV, vllm_server)
    cfg = config_for_run("smoke", [*overrides, "rollout.backend=vllm_server"], str(out))
    trainer, _ = build_trainer(cfg, StopRequest(), reward_funcs=[reward])
    trainer.train()
    return cfg, trainer, results.read_train_log(CellFolder(cfg.output.dir).train_log)


def _rising(rows) -> tuple[float, float]:
    rewards = [r["reward"] for r in rows if "reward" in r]
    fifth = len(rewards) // 5
    return sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth


@pytest.fixture(scope="module")
def on_policy_run(vllm_server, tmp_path_factory, learning_task):
    """The learning-signal task with server rollouts, on-policy, 4 optimizer steps per batch:
    80 steps are 20 generation batches, so the last fifth lies past the reward's take-off also on
    a CPU where it comes late (the colocated twin in test_rollout failed CI with 12)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        cfg, trainer, rows = _train(vllm_server, tmp_path_factory.mktemp("on_policy"),
                                    [*learning_task.overrides, "grpo.num_iterations=4", "grpo.max_steps=80"],
                                    learning_task.reward, monkeypatch)
        yield cfg, trainer, rows
        trainer.close_rollout()


@pytest.mark.slow
@pytest.mark.vllm
def test_learning_signal_with_server_rollouts(on_policy_run):
    cfg, trainer, rows = on_policy_run
    first, last = _rising(rows)
    assert trainer.state.global_step == cfg.grpo.max_steps and last >= 3 * first, (first, last)
    generated = [r for r in rows if "rollout/staleness" in r]
    # one version per generation batch (every 4 updates), each sampled from the policy as it was
    assert len(generated) == cfg.grpo.max_steps // 4 and {r["rollout/staleness"] for r in generated} == {0.0}
    assert 0 < generated[-1]["rollout/sync_bytes"] < 5_000_000
    # on-policy (the paper): no importance sampling correction
    assert not any("sampling/importance_sampling_ratio/mean" in r for r in rows)


@pytest.mark.slow
@pytest.mark.vllm
def test_greedy_tokens_from_the_server_equal_hf_generate_with_the_same_adapter(on_policy_run, hf_greedy_tokens):
    _, trainer, _ = on_policy_run
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(render_prompt(tokenizer, p, h), add_special_tokens=False).input_ids for p, h in PAIRS]
    served = trainer.server_generate(prompt_ids, temperature=0.0, max_tokens=12)

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    hf_tokens = hf_greedy_tokens(model, tokenizer, prompt_ids, max_new_tokens=12)
    assert served == hf_tokens
    with torch.no_grad(), model.disable_adapter():  # the trained adapter changed what the model says
        base = model.generate(input_ids=torch.tensor([prompt_ids[0]]), do_sample=False, max_new_tokens=12,
                              pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids[0]):].tolist()
    assert base != hf_tokens[0]


@pytest.mark.slow
@pytest.mark.vllm
def test_generating_one_version_ahead_still_learns_with_the_importance_sampling_correction(vllm_server, tmp_path, learning_task,
                                                                                          monkeypatch):
    cfg, trainer, rows = _train(vllm_server, tmp_path, [*learning_task.overrides, "rollout.max_staleness=1"],
                                learning_task.reward, monkeypatch)
    trainer.close_rollout()
    first, last = _rising(rows)
    assert trainer.state.global_step == cfg.grpo.max_steps and last >= 3 * first, (first, last)
    staleness = [r["rollout/staleness"] for r in rows if "rollout/staleness" in r]
    # the first batch is generated on the spot, every later one while the previous trained:
    # never a batch generated on the spot again (it would show staleness 0)
    assert staleness[0] == 0 and set(staleness[1:]) == {1.0} and len(staleness) == cfg.grpo.max_steps
    ratios = [r["sampling/importance_sampling_ratio/mean"] for r in rows if "sampling/importance_sampling_ratio/mean" in r]
    assert len(ratios) == cfg.grpo.max_steps and all(0.2 < x < 3.0 for x in ratios)
    assert any(abs(x - 1.0) > 1e-3 for x in ratios[1:])  # stale samples: the correction is not the identity
    assert not CellFolder(cfg.output.dir).rollout_adapters.exists()  # closing removed the versions' files
