"""Exact resume, for real on the CPU: a cell stopped at any step and resumed ends with the same
per-step training log and the bit-identical final adapter as the same cell never stopped, with
HF rollouts and with colocated vLLM rollouts (vLLM's CPU build).

The cell: the smoke recipe at 6 optimizer steps, 2 prompts x 4 completions per step,
num_iterations 2 (a generation cycle is 2 steps: odd steps generate, even steps reuse the batch),
a pool of 4 prompts (an epoch is 4 steps: steps 5-6 are epoch 1) and a checkpoint every 5 steps.
To keep CI short, one uninterrupted reference run per backend is compared with one run of the
same cell interrupted four times, each attempt a fresh process state (and vLLM engine):
1. SIGUSR2 after step 1: inside a generation cycle (the buffered batch must survive the restart);
2. SIGTERM after step 2: at a cycle boundary (the next batch is sampled from restored RNG/seeds);
3. SIGKILL after step 6, in a process of its own: nothing saved since checkpoint-5, which was
   written inside a cycle of epoch 1;
4. the replay from checkpoint-5: epoch 1's prompt order (not epoch 0's), the buffered batch.
After each signal stop the log so far must equal the reference's; at the end, every logged step
and the final adapter's bytes. The signals are sent by the process to itself from a trainer
callback at the end of the step, so the stop lands on that step exactly (as Slurm's would land
on whichever step is in flight)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nli_grpo import results, training
from nli_grpo.job import EXIT_PREEMPTED, config_for_run, run
from nli_grpo.layout import CellFolder

pytestmark = pytest.mark.slow

CELL = ["grpo.max_steps=6", "grpo.completions_per_step=8", "grpo.num_generations=4", "grpo.num_iterations=2",
        "grpo.max_completion_length=8", "data.train_limit=4", "grpo.save_steps=5", "grpo.save_total_limit=10",
        "eval.after_training=false"]
#: Log fields that are wall-clock measurements (they differ between any two runs).
TIMING = {"time", "attempt", "step_time", "rollout/sync_seconds", "rollout/publish_seconds", "rollout/wait_seconds"}
BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


def reward(completion_ids, **_):
    """Depends on what was sampled (a share of low token ids), so any change of the completions
    changes the advantages, the loss and the adapter."""
    return [sum(t < 60 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def cell(out: Path, backend: str, *extra: str):
    return config_for_run("smoke", [*CELL, f"rollout.backend={backend}", *extra], str(out))


def signal_after_step(step: int, sig: signal.Signals):
    """training._trainer_callbacks plus one that sends `sig` to this process at the end of `step`,
    ahead of the job's own StopOnSignal (which then stops after that very step)."""
    from transformers import TrainerCallback

    original = training._trainer_callbacks

    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), sig)

    def callbacks(*args, **kwargs):
        return [SignalAt(), *original(*args, **kwargs)]

    return callbacks


def run_cell(out: Path, backend: str, *extra: str, stop_after: int | None = None, sig=signal.SIGUSR2) -> int:
    """The job for the cell in this process, stopped by `sig` after step `stop_after` (None: not)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        with pytest.MonkeyPatch.context() as patch:
            if stop_after is not None:
                patch.setattr(training, "_trainer_callbacks", signal_after_step(stop_after, sig))
            return run(cell(out, backend, *extra), reward_funcs=[reward])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_resume
from nli_grpo import training
from nli_grpo.job import run
training._trainer_callbacks = test_resume.signal_after_step({step}, signal.SIGKILL)
run(test_resume.cell({out!r}, {backend!r}, *{extra!r}), reward_funcs=[test_resume.reward])
"""


def killed_after(out: Path, backend: str, step: int, *extra: str) -> None:
    """The job for the cell in a process of its own, SIGKILLed at the end of `step`. The kill
    orphans vLLM's engine process (Slurm's kill of the job's cgroup would take it too): it is
    killed with the process group the job was started in."""
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), step=step, out=str(out), backend=backend, extra=extra)
    log = out.parent / "killed_job.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        returncode = proc.wait(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert returncode == -signal.SIGKILL, log.read_text()[-4000:]


def logged_steps(out: Path) -> list[dict]:
    """Every logged step (the last attempt's line), timings left out."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in results.read_train_log(CellFolder(out).train_log)]


def assert_same_steps(got_steps: list[dict], want_steps: list[dict]) -> None:
    assert [r["step"] for r in got_steps] == [r["step"] for r in want_steps]
    for got, want in zip(got_steps, want_steps):
        assert got == want, f"step {got['step']} differs: " + str({k: (got.get(k), want.get(k)) for k in got.keys() | want.keys()
                                                                    if got.get(k) != want.get(k)})


def adapter_bytes(out: Path) -> bytes:
    return (CellFolder(out).adapter / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module", params=BACKENDS)
def reference(request, tmp_path_factory):
    """(backend, folder) of the cell run without interruption."""
    out = tmp_path_factory.mktemp(f"reference_{request.param}")
    assert run_cell(out, request.param) == 0
    return request.param, out


def test_a_cell_stopped_and_killed_at_any_step_and_resumed_is_the_cell_never_stopped(reference, tmp_path):
    backend, reference_out = reference
    want = logged_steps(reference_out)
    assert [r["step"] for r in want] == list(range(1, 7))
    out = tmp_path / "run"
    for step, sig in [(1, signal.SIGUSR2), (2, signal.SIGTERM)]:
        assert run_cell(out, backend, stop_after=step, sig=sig) == EXIT_PREEMPTED
        doc = results.read_result(out / "result.json")
        assert (doc["train"]["resumed_from_step"], doc["train"]["steps_done"]) == (step - 1, step)
        assert_same_steps(logged_steps(out), want[:step])
    killed_after(out, backend, 6)
    assert run_cell(out, backend) == 0
    assert results.read_result(out / "result.json")["train"]["resumed_from_step"] == 5
    assert_same_steps(logged_steps(out), want)
    assert adapter_bytes(out) == adapter_bytes(reference_out), "the same log, but not the same adapter"
