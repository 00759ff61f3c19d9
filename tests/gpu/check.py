"""The GPU check: what the CPU cannot measure, in one run of under 10 minutes on one GPU.

    python tests/gpu/check.py --download           # on a machine with PyPI: the wheels into .gpu-wheels/
    python3 tests/gpu/check.py --out gpu-check.json  # on the GPU machine (no network needed)

Made for a borrowed GPU machine that has torch with CUDA, transformers, peft and accelerate but
not the rest of the stack and no network: it brings the missing packages as wheels
(tests/gpu/wheels.txt, at most 64 MiB with the repository), installs them without an index into
a folder of its own, then runs `pytest -m gpu` and the HF-path GPU benchmarks: GRPO steps at the
Qwen2.5-7B shape in bf16, float16 weights under bf16 autocast (the paper's recipe) and bnb-4bit,
and the 32B bnb-4bit step against the paper's 22 GB. It writes one JSON (--out) after each step,
so a run cut short keeps what it measured. vLLM does not fit in the files such a machine takes:
its sides are reported unavailable. Without a CUDA GPU it is a dry run: it says so, checks what it
can (the wheels, the benchmarks and tests it names), and exits 0 without figures.
It imports nothing of the project: the steps run in child processes, after the install."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEEL_LIST = Path(__file__).with_name("wheels.txt")
WHEEL_DIR = ROOT / ".gpu-wheels"
CARRY_LIMIT = 64 * 2**20   # what the borrowed machine takes along: the repository and the wheels
TIME_LIMIT_S = 570         # the whole check, install included, inside a 10-minute call
PAPER_32B_GB = 22          # the paper: 32B (AWQ) GRPO within 22 GB of CUDA memory
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
PYTEST_MAX_S = 240        # pytest -m gpu's share, so that the benchmarks always get their turn
# (name in the JSON, benchmark model, grpo_step variants, most seconds: None = what is left)
BENCHMARKS = [("grpo_step_7b", "random:qwen2.5-7b", "bf16,fp16_bf16_autocast,bnb4", 180),
              ("grpo_step_32b_bnb4", "random:qwen2.5-32b", "bnb4", None)]


def wheel_requirements() -> list[str]:
    """The pinned packages of tests/gpu/wheels.txt (`name==version`, comments dropped)."""
    lines = (line.split("#")[0].strip() for line in WHEEL_LIST.read_text().splitlines())
    return [line for line in lines if line]


def isolated_pip_env() -> dict:
    """This machine's pip settings set aside (local indexes, constraints): PyPI's files only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def download(python_version: str, folder: Path) -> int:
    """The wheels for the GPU machine's Python into `folder`; refuses a set over the carry limit."""
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    fetch = [sys.executable, "-m", "pip", "-q", "--no-input", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(folder), *wheel_requirements()]
    if subprocess.run(fetch, env=isolated_pip_env()).returncode != 0:
        return 1
    total = sum(f.stat().st_size for f in folder.glob("*.whl"))
    print(f"{len(list(folder.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {folder}")
    if total + repository_bytes() > CARRY_LIMIT:
        print(f"error: the wheels and the repository exceed {CARRY_LIMIT // 2**20} MiB", file=sys.stderr)
        return 1
    return 0


def wheel_sizes(python_version: str) -> dict[str, int]:
    """requirement -> bytes of the wheel `--download` takes for it (PyPI's index, nothing fetched)."""
    import urllib.request

    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(part) for part in python_version.split("."))
    accepted = {*cpython_tags(version, platforms=PLATFORMS), *compatible_tags(version, platforms=PLATFORMS)}
    sizes = {}
    for requirement in wheel_requirements():
        name, pinned = requirement.split("==")
        request = urllib.request.Request(f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        fitting = [f["size"] for f in files if f["filename"].endswith(".whl")
                   and str(parse_wheel_filename(f["filename"])[1]) == pinned
                   and parse_wheel_filename(f["filename"])[3] & accepted]
        if not fitting:
            raise SystemExit(f"error: no wheel of {requirement} for CPython {python_version} on Linux x86-64")
        sizes[requirement] = max(fitting)
    return sizes


def repository_bytes() -> int:
    """Size of the tracked files (what travels besides the wheels)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def gpu_test_files() -> list[str]:
    """The test modules with GPU tests: collecting only these, a module that imports vLLM (absent
    there) cannot fail the collection."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def collect_gpu_tests() -> int:
    """How many GPU tests pytest collects (their modules import): the dry run's check of that step."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           *gpu_test_files()], cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"error: collecting the GPU tests failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    print(f"pytest collects {found.group(1)} GPU tests from {', '.join(gpu_test_files())}")
    return int(found.group(1))


def check_benchmarks() -> None:
    """The benchmark and variants each step names exist (nli_grpo.bench, in a child process)."""
    variants = sorted({v for _, _, names, _ in BENCHMARKS for v in names.split(",")})
    probe = ("import sys; from nli_grpo.bench import BENCHMARKS, GRPO_STEP_VARIANTS; "
             f"missing = {{'grpo_step'}} - set(BENCHMARKS) | set({variants!r}) - set(GRPO_STEP_VARIANTS); "
             "sys.exit(f'unknown: {sorted(missing)}' if missing else 0)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the benchmark steps name what nli_grpo.bench lacks: {proc.stderr[-2000:]}")
    print(f"nli_grpo.bench has grpo_step and its variants {', '.join(variants)}")


def cuda_device() -> str | None:
    """The CUDA device's name, or None without one (asked in a child process: importing torch here
    would hold the GPU's context for the whole check)."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return proc.stdout.strip() or None


def machine_facts() -> dict:
    probe = ("import json, platform, torch, transformers, peft, accelerate; print(json.dumps({'python': platform.python_version(), "
             "'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, "
             "'peft': peft.__version__, 'accelerate': accelerate.__version__}))")
    facts = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return {**facts, "nvidia_smi": smi.stdout.strip()}


class Check:
    """The steps, each bounded by what is left of the time limit; the JSON rewritten after each."""

    def __init__(self, out: Path, env: dict):
        self.out, self.env, self.started = out, env, time.monotonic()
        self.results: dict = {"time_limit_s": TIME_LIMIT_S}

    def left(self) -> float:
        return TIME_LIMIT_S - (time.monotonic() - self.started)

    def save(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.started, 1)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(partial, self.out)

    def run(self, name: str, cmd: list[str], max_s: float | None = None) -> subprocess.CompletedProcess | None:
        """`cmd` for at most `max_s` and what is left of the time; None (and the step marked) when it runs out."""
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if self.left() < 30:
            self.results[name] = {"skipped": "no time left"}
            return None
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, timeout=min(self.left(), max_s or TIME_LIMIT_S),
                                  text=True, capture_output=True)
        except subprocess.TimeoutExpired:
            self.results[name] = {"timed_out": True}
            return None
        sys.stdout.write(proc.stdout[-5000:])
        sys.stderr.write(proc.stderr[-5000:])
        return proc

    def pytest_gpu(self) -> None:
        junit = Path(tempfile.mkdtemp()) / "junit.xml"
        proc = self.run("pytest_gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-s", "-p", "no:cacheprovider",
                                       f"--junitxml={junit}", *gpu_test_files()], PYTEST_MAX_S)
        if proc is None:
            return
        tests = {}
        for case in ElementTree.parse(junit).getroot().iter("testcase") if junit.exists() else []:
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            tests[case.get("name")] = {"outcome": problem.tag if problem is not None else "passed",
                                       "seconds": round(float(case.get("time", 0)), 1),
                                       **({"message": (problem.get("message") or "")[:500]} if problem is not None else {})}
        # the tests' own report lines ("7B bf16 r64 (hf rollouts): peak ... GB ...")
        self.results["pytest_gpu"] = {"exit_code": proc.returncode, "tests": tests,
                                      "printed": re.findall(r"^\S*7B .*GB.*$", proc.stdout, re.MULTILINE)}

    def bench(self, name: str, model: str, variants: str, max_s: float | None) -> None:
        """grpo_step on `model`, one process per variant (a variant cut short costs only itself),
        all of them within `max_s`; their figures merged under `name`."""
        deadline = time.monotonic() + (max_s or TIME_LIMIT_S)
        merged: dict = {}
        for variant in variants.split(","):
            figures_file = Path(tempfile.mkdtemp()) / "figures.json"
            env_before, self.env = self.env, {**self.env, "NLI_GRPO_BENCH_STEP_VARIANTS": variant}
            proc = self.run(f"{name}_{variant}", [sys.executable, "-m", "nli_grpo.bench", "grpo_step", "--model", model,
                                                  "--json", str(figures_file)], max(1.0, deadline - time.monotonic()))
            self.env = env_before
            if figures_file.exists():
                merged.update(json.loads(figures_file.read_text())["grpo_step"])
            else:
                merged[variant] = self.results.pop(f"{name}_{variant}", None) or {"exit_code": proc.returncode,
                                                                                 "stderr": proc.stderr[-1500:]}
            self.results[name] = merged
            self.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download", action="store_true", help="fetch the wheels into .gpu-wheels/ (needs PyPI) and stop")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for --download (default 3.12)")
    parser.add_argument("--wheels", type=Path, default=WHEEL_DIR, help="the wheels' folder (default .gpu-wheels/)")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check.json", help="the JSON (default gpu-check.json)")
    args = parser.parse_args(argv)
    if args.download:
        return download(args.python_version, args.wheels)

    wheels = sorted(args.wheels.glob("*.whl"))
    plan = {"wheels": [w.name for w in wheels], "pytest": gpu_test_files(),
            "benchmarks": {name: {"model": model, "variants": variants} for name, model, variants, _ in BENCHMARKS}}
    device = cuda_device()
    if device is None:
        print("No CUDA GPU here: dry run. Nothing is measured; this is what a GPU machine would run:")
        print(json.dumps(plan, indent=2))
        plan["gpu_tests_collected"] = collect_gpu_tests()
        check_benchmarks()
        missing = sorted({r.split("==")[0].lower().replace("-", "_") for r in wheel_requirements()}
                         - {w.name.split("-")[0].lower() for w in wheels})
        if missing:
            print(f"(.gpu-wheels/ lacks {', '.join(missing)}: `python tests/gpu/check.py --download` fetches them)")
        args.out.write_text(json.dumps({"dry_run": True, "reason": "no CUDA GPU", "plan": plan}, indent=2) + "\n")
        return 0

    site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    check = Check(args.out, env)
    check.results.update(device=device, plan=plan)
    if wheels:
        install = check.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                        "--target", str(site), *map(str, wheels)])
        if install is None or install.returncode != 0:
            check.results["install"] = {"error": install.stderr[-2000:] if install else "timed out"}
            check.save()
            return 1
    check.results["machine"] = machine_facts()
    check.save()
    check.pytest_gpu()
    check.save()
    for name, model, variants, max_s in BENCHMARKS:
        check.bench(name, model, variants, max_s)
        check.save()
    step_32b = check.results.get("grpo_step_32b_bnb4", {})
    if isinstance(step_32b.get("bnb4_peak_memory_gb"), (int, float)):
        step_32b["paper_32b_gb"] = PAPER_32B_GB
        step_32b["within_paper_32b_gb"] = step_32b["bnb4_peak_memory_gb"] <= PAPER_32B_GB
    check.save()
    print(json.dumps(check.results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
