"""A vLLM OpenAI-compatible server inside a cell's own allocation (`rollout.backend: vllm_server`):
started on the GPUs the cell reserves for generation (`rollout.server_gpus`; the CPU build here),
with LoRA and runtime adapter loading enabled, on a free local port, health-checked before training
starts, and always stopped with the job (on success, failure, USR2 or requeue): it runs in a
session of its own, is signalled as a group, and gets SIGTERM from the kernel if the process that
started it dies (PR_SET_PDEATHSIG), so no server outlives its job. A restarted job starts a fresh one.

The process that starts training starts the server: `launch.CellJob` for sweep jobs (before
torchrun, so that the training ranks get the other GPUs), else `python -m nli_grpo.train` itself.
The training process finds it through NLI_GRPO_VLLM_SERVER_URL (nli_grpo.rollout talks to it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExperimentConfig
from .grid import server_memory_share, vllm_cpu_kv_cache_bytes

log = logging.getLogger("nli_grpo.server")

#: Where the training process finds the server.
URL_ENV = "NLI_GRPO_VLLM_SERVER_URL"
#: Seconds to wait for the server to answer /health (loading a 32B model takes minutes).
READY_TIMEOUT_S = 900
LOG_FILENAME = "vllm_server.log"


def free_port() -> int:
    """A free local TCP port (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: LoRA ranks vLLM's kernels are built for; max_lora_rank must be one of them.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM supports that holds `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def logprobs_mode(cfg: ExperimentConfig) -> str:
    """What vLLM reports as a sampled token's log-prob, for the importance sampling correction to
    compare with the loss's: at grpo.loss_temperature 1 (the paper) the model's own log-probs
    (`raw_logprobs`); at the sampling temperature, those after temperature and top-k / top-p
    (`processed_logprobs`, what TRL's servers use). Config validation allows no other."""
    loss_temperature = cfg.grpo.loss_temperature or cfg.grpo.temperature
    return "raw_logprobs" if loss_temperature == 1.0 else "processed_logprobs"


def split_devices(cfg: ExperimentConfig, visible: list[str]) -> tuple[list[str], list[str]]:
    """(server devices, training devices) of the visible GPUs: the first rollout.server_gpus for
    the server, the rest for training. No GPUs (a CPU node): both empty."""
    if not visible:
        return [], []
    count = cfg.rollout.server_gpus
    if len(visible) <= count:
        raise ValueError(f"rollout.server_gpus={count} leaves no GPU for training out of the {len(visible)} visible "
                         f"({','.join(visible)}): ask for more (resources.gpus_per_node) or fewer server GPUs")
    return visible[:count], visible[count:]


def server_command(cfg: ExperimentConfig, model_path: str, port: int, devices: list[str]) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` for the run's base model, serving LoRA
    adapters up to the run's rank, enough of them at once for max_staleness + 2 versions."""
    rank = vllm_max_lora_rank(max(cfg.lora.rank, cfg.rollout.max_lora_rank or 0))
    max_len = cfg.rollout.max_model_len or cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length
    share = server_memory_share(cfg) if devices else 0.2  # on the CPU backend: of host memory (0.9 fails)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name", "base",
        "--host", "127.0.0.1", "--port", str(port), "--seed", str(cfg.seed), "--max-model-len", str(max_len),
        "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(cfg.rollout.max_staleness + 2),
        "--gpu-memory-utilization", str(share), "--dtype", server_dtype(cfg, bool(devices)),
        "--logprobs-mode", logprobs_mode(cfg),
    ]
    if len(devices) > 1:
        command += ["--tensor-parallel-size", str(len(devices))]
    if not devices:
        # vLLM's CPU backend dies ("CPU Generator does not use offset") when it splits the prefill
        # of a seeded request over steps; every request is seeded, so none may be split: a step's
        # token budget holds every sequence that can be in flight (max_staleness + 1 batches).
        in_flight = cfg.grpo.completions_per_step * (cfg.rollout.max_staleness + 1)
        command += ["--max-num-batched-tokens", str(max(2048, max_len * in_flight))]
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # the KV cache sized from the need, as colocated
            import psutil

            kv_bytes = vllm_cpu_kv_cache_bytes(cfg, "rollout", max_len, 4, psutil.virtual_memory().total)
            command += ["--kv-cache-memory-bytes", str(kv_bytes)]
    if cfg.model.revision:
        command += ["--revision", cfg.model.revision]
    if cfg.rollout.enforce_eager:
        command.append("--enforce-eager")
    if cfg.model.trust_remote_code:
        command.append("--trust-remote-code")
    return command


def server_dtype(cfg: ExperimentConfig, cuda: bool) -> str:
    """The weights' dtype of the policy as trained (model.dtype) on GPUs; float32 on the CPU."""
    return cfg.model.dtype if cuda else "float32"


def _die_with_parent() -> None:
    """In the server's process, before exec: its own session, USR2 ignored (it is not a training
    rank), and SIGTERM when its parent dies, however it dies."""
    os.setsid()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the session and stop() still cover it
        pass


@dataclass
class VLLMServer:
    """One server process: start(), wait_ready(), url, stop(); a context manager."""

    cfg: ExperimentConfig
    devices: list = field(default_factory=list)
    log_path: Path | None = None
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VLLMServer:
        from .models import resolve_model_path

        self.port = self.port or free_port()
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "PYTHONUNBUFFERED": "1"}
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        else:  # vLLM's CPU backend: both cores, as the trainer (it reserves one by default)
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        command = server_command(self.cfg, resolve_model_path(self.cfg.model.name_or_path), self.port, self.devices)
        log.info("starting the vLLM server: %s", " ".join(command))
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._output = output
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until /health answers; RuntimeError with the log's tail when the server died first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode} while starting: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the vLLM server did not answer {self.url}/health within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path and Path(self.log_path).is_file():
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        return "(no log)"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # engine processes left in its group
            os.killpg(self.process.pid, signal.SIGKILL)
            # ... and gone before stop returns (the engine core exits a moment after the server:
            # the next start, or evaluation's engine, must not find it holding memory). Bounded:
            # an orphaned zombie stays in the group until init reaps it.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.killpg(self.process.pid, 0)  # ProcessLookupError once the group is empty
                time.sleep(0.1)
        if self._output not in (None, subprocess.DEVNULL):
            self._output.close()
        log.info("stopped the vLLM server (%s)", self.url)
        self.process = None

    def __enter__(self) -> VLLMServer:
        if self.process is None:
            self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def visible_devices() -> list[str]:
    """The GPUs this process may use, without initialising CUDA: those nvidia-smi lists, narrowed
    to CUDA_VISIBLE_DEVICES (Slurm sets it) when set. None on a node without NVIDIA GPUs, whatever
    CUDA_VISIBLE_DEVICES says (a test cluster's GRES may name GPUs that are not there)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    present = [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not present or given is None:
        return present
    return [d.strip() for d in given.split(",") if d.strip()]


@contextlib.contextmanager
def serving(cfg: ExperimentConfig, run_dir: str | os.PathLike):
    """For a `vllm_server` cell not served yet (NLI_GRPO_VLLM_SERVER_URL unset): start the server on
    its share of the visible GPUs and yield the environment the training processes need (the URL,
    and CUDA_VISIBLE_DEVICES of the training GPUs); stop it on the way out, whatever happened.
    Yields {} for other cells, or when a server is already given."""
    if cfg.rollout.backend != "vllm_server" or cfg.stage != "grpo" or os.environ.get(URL_ENV):
        yield {}
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"rollout.backend=vllm_server under torchrun needs the server started before the ranks "
                           f"({URL_ENV} is unset): launch the cell through a sweep (its job starts the server, then "
                           "torchrun), or start one yourself and set the variable")
    visible = visible_devices()
    if not visible and cfg.resources.gpus_per_node > 0:
        # Else the server would start on vLLM's CPU backend and "train" for days at CPU speed.
        raise RuntimeError(f"rollout.backend=vllm_server on a GPU cell (resources.gpus_per_node={cfg.resources.gpus_per_node}), "
                           "but no GPU is visible here (nvidia-smi is missing or lists none): run the cell on a GPU node, "
                           "or set resources.gpus_per_node=0 for a CPU run")
    server_gpus, training_gpus = split_devices(cfg, visible)
    server = VLLMServer(cfg, server_gpus, Path(run_dir) / LOG_FILENAME)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        server.wait_ready()
        env = {URL_ENV: server.url}
        if training_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(training_gpus)
        yield env
    finally:
        server.stop()


def post_json(url: str, payload: dict, timeout: float = 600.0) -> dict:
    """POST a JSON payload, return the JSON answer ({"text": ...} for a plain-text one);
    RuntimeError with the server's message on an HTTP error."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url}: HTTP {err.code}: {err.read().decode(errors='replace')[:2000]}") from None
    try:
        return json.loads(body)
    except ValueError:  # the adapter endpoints answer in plain text
        return {"text": body.decode(errors="replace")}
