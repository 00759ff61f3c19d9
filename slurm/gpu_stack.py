"""Resolve the `gpu` extra for Linux x86-64 GPU nodes without installing anything.

    python slurm/gpu_stack.py                        # resolve for CPython 3.11 and 3.12, print the versions
    python slurm/gpu_stack.py --write-constraints    # ... and rewrite slurm/gpu-constraints.txt from them

pip's dry run (`pip install --dry-run --report`) for a platform other than this one accepts only
wheels, but a few packages of the stack publish source archives alone (SOURCE_ONLY). Their
metadata is read from their source archives first (PKG-INFO, or pip's metadata build where
setup.py computes it; no compiler), and a metadata-only stand-in wheel of each (same name,
version, dependencies and Python range) lets the platform resolution see their dependencies as a
real install would. The registry is PyPI alone:
this machine's pip configuration (its find-links, local indexes, constraints) is set aside, so a
local wheel or cap cannot make a resolution pass here that fails on a cluster.
Needs only the standard library, pip and packaging: runs where nothing of the project is installed."""

from __future__ import annotations

import argparse
import concurrent.futures
import configparser
import email.parser
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "slurm" / "gpu-constraints.txt"
INDEX_URL = "https://pypi.org/simple"
PYTHONS = ("3.11", "3.12")
# Every manylinux tag a node with glibc >= 2.31 (Ubuntu 20.04, RHEL/Rocky 9) accepts: vLLM 0.31
# needs llguidance 1.7, whose wheels need glibc 2.31. pip matches each tag exactly, it does not
# infer the older ones.
PLATFORMS = (*(f"manylinux_2_{n}_x86_64" for n in range(31, 4, -1)),
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
# Published as source archives only (no wheel on PyPI): deepspeed, gptqmodel and gptqmodel's
# helpers. None compiles CUDA code at install time.
SOURCE_ONLY = ("deepspeed", "gptqmodel", "device-smi", "pypcre", "tokenicer", "logbar", "defuser")
# pip evaluates environment markers (`; python_version > "3.11"`) for the interpreter that runs
# it, not for --python-version (pypa/pip#11010, #13296). The target's version is set where
# packaging reads it, before pip first evaluates a marker, so a 3.12 resolution from 3.11 sees
# 3.12's dependencies.
PIP_FOR_TARGET = """
import platform, sys
version = sys.argv.pop(1)
if version:
    full = version + ".0"
    platform.python_version = lambda: full
    platform.python_version_tuple = lambda: tuple(full.split("."))
from pip._internal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
# Kept from this machine's pip settings: how to reach the registry, not what it serves.
PIP_ENV_KEPT = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_PROXY", "PIP_RETRIES")


def normalize(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def gpu_requirements(setup_cfg: Path = ROOT / "setup.cfg") -> list[str]:
    """What `pip install '.[gpu]'` asks for: install_requires plus the gpu extra (setup.cfg)."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)

    def lines(value: str) -> list[str]:
        return [line.split(" #")[0].strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]

    return lines(cfg["options"]["install_requires"]) + lines(cfg["options.extras_require"]["gpu"])


def pip_report(args: list[str], python_version: str = "") -> dict:
    """`pip install --dry-run --report` against PyPI alone; the report as a dict (pip's JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in PIP_ENV_KEPT}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    with tempfile.TemporaryDirectory(prefix="gpu_stack_") as tmp:
        report = Path(tmp) / "report.json"
        # fast-deps: pip reads each wheel's METADATA by HTTP range requests where the index serves
        # no separate metadata file (PEP 658); else a dry run downloads every wheel (~5 GB here).
        cmd = [sys.executable, "-c", PIP_FOR_TARGET, python_version, "install", "--dry-run", "--ignore-installed",
               "--quiet", "--no-input", "--use-feature=fast-deps", "--index-url", INDEX_URL, "--report", str(report), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise ResolutionError(f"pip could not resolve ({' '.join(args[-6:])}):\n{proc.stderr[-6000:]}")
        return json.loads(report.read_text())


class ResolutionError(RuntimeError):
    """The stack does not resolve; the message holds pip's own explanation."""


def sdist_metadata(name: str, specifier: str) -> dict:
    """Core metadata (the fields of pip's report) of the newest source archive of `name` that
    `specifier` allows, read from its PKG-INFO: with Metadata-Version 2.2 or later, every field not
    marked Dynamic is what a build produces (PEP 643), so nothing is built (pip's dry run builds
    each archive's metadata in a fresh build environment: over a minute for these seven). An
    archive whose dependencies are computed at build time goes through pip's build."""
    request = urllib.request.Request(f"{INDEX_URL}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    sdists = {}
    for f in files:
        match = re.fullmatch(rf"{re.sub(r'[-_.]+', '[-_.]+', name)}-(.+)\.tar\.gz", f["filename"], re.IGNORECASE)
        if match and not f.get("yanked"):
            sdists[Version(match.group(1))] = f["url"]
    allowed = sorted(SpecifierSet(specifier).filter(sdists))
    if not allowed:
        raise ResolutionError(f"{name}: no source archive on PyPI matches '{specifier}'")
    with urllib.request.urlopen(sdists[allowed[-1]], timeout=120) as response:
        archive = tarfile.open(fileobj=io.BytesIO(response.read()))
    pkg_info = next(m for m in archive.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
    headers = email.parser.Parser().parsestr(archive.extractfile(pkg_info).read().decode())
    dynamic = {d.lower() for d in headers.get_all("Dynamic", [])}
    if Version(headers["Metadata-Version"]) < Version("2.2") or dynamic & {"requires-dist", "requires-python"}:
        # computed by its setup.py (deepspeed): pip builds the metadata (seconds, no compiler)
        return pip_report(["--no-deps", f"{name}=={allowed[-1]}"])["install"][0]["metadata"]
    return {"name": headers["Name"], "version": headers["Version"], "requires_python": headers.get("Requires-Python"),
            "requires_dist": headers.get_all("Requires-Dist", []), "provides_extra": headers.get_all("Provides-Extra", [])}


def source_only_metadata(requirements: list[str]) -> dict[str, dict]:
    """name -> core metadata of every source-only package the stack reaches: the requirement's
    own version when pinned, else the newest that its dependants allow (their specifiers joined)."""
    specifiers = {requirement_name(r): [re.sub(r"^\s*[A-Za-z0-9._-]+", "", r.split(";")[0]).strip()]
                  for r in requirements if requirement_name(r) in SOURCE_ONLY}
    found: dict[str, dict] = {}
    while pending := [name for name in specifiers if name not in found]:
        for name in pending:
            found[name] = sdist_metadata(name, ",".join(filter(None, specifiers[name])))
            for dependency in found[name]["requires_dist"]:
                dep = requirement_name(dependency)
                if dep in SOURCE_ONLY and "extra ==" not in dependency:
                    specifiers.setdefault(dep, []).append(re.sub(r"^\s*[A-Za-z0-9._-]+", "", dependency.split(";")[0]).strip())
    return found


def write_stand_in(meta: dict, folder: Path) -> Path:
    """A wheel holding only `meta` (name, version, dependencies, Python range): what the resolver
    reads of a package, and nothing to install."""
    name, version = re.sub(r"[-.]+", "_", meta["name"]), meta["version"]
    dist_info = f"{name}-{version}.dist-info"
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {version}"]
    if meta.get("requires_python"):
        lines.append(f"Requires-Python: {meta['requires_python']}")
    lines += [f"Requires-Dist: {r}" for r in meta.get("requires_dist", [])]
    lines += [f"Provides-Extra: {e}" for e in meta.get("provides_extra", [])]
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{dist_info}/METADATA", "\n".join(lines) + "\n")
        whl.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: slurm/gpu_stack.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist_info}/RECORD", "")
    return path


def resolve(python_version: str, requirements: list[str], stand_ins: Path, constraints: Path | None = None,
            offline: bool = False) -> dict[str, str]:
    """name -> version that pip picks for Linux x86-64 CPython `python_version` (wheels only,
    source-only packages through their stand-ins in `stand_ins`; `offline`: from them alone)."""
    platform_args = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    report = pip_report(["--only-binary=:all:", *platform_args, "--implementation", "cp", "--python-version", python_version,
                         *(["--no-index"] if offline else []), "--find-links", str(stand_ins),
                         *(["--constraint", str(constraints)] if constraints else []), *requirements], python_version)
    versions = {}
    for item in report["install"]:
        url = item["download_info"]["url"]
        if not (url.startswith("https://files.pythonhosted.org/") or url.startswith(stand_ins.as_uri())):
            raise ResolutionError(f"{item['metadata']['name']} came from {url}, not from PyPI: a local index leaked in")
        versions[normalize(item["metadata"]["name"])] = item["metadata"]["version"]
    return versions


def resolve_stack(pythons: tuple[str, ...] = PYTHONS, constraints: Path | None = CONSTRAINTS) -> dict[str, dict[str, str]]:
    """Python version -> {name: version} of the whole `gpu` install, resolved from PyPI for
    Linux x86-64 (with `constraints` when given)."""
    requirements = gpu_requirements()
    with tempfile.TemporaryDirectory(prefix="gpu_stack_stand_ins_") as tmp:
        for meta in source_only_metadata(requirements).values():
            write_stand_in(meta, Path(tmp))
        # one pip process per Python, side by side: each waits on the registry, not on the CPU
        with concurrent.futures.ThreadPoolExecutor(len(pythons)) as pool:
            futures = {python: pool.submit(resolve, python, requirements, Path(tmp), constraints) for python in pythons}
            return {python: future.result() for python, future in futures.items()}


def constraints_text(stacks: dict[str, dict[str, str]]) -> str:
    """One `name==version` line per package, with a python_version marker where the Pythons differ."""
    lines = []
    for name in sorted({n for stack in stacks.values() for n in stack}):
        pins = {python: stack.get(name) for python, stack in stacks.items()}
        if len(set(pins.values())) == 1:
            lines.append(f"{name}=={next(iter(pins.values()))}")
        else:
            lines += [f'{name}=={version}; python_version == "{python}"' for python, version in pins.items() if version]
    header = ("# The GPU stack, resolved for Linux x86-64 (glibc >= 2.31) CPython 3.11 and 3.12 by\n"
              "# `python slurm/gpu_stack.py --write-constraints`; CI resolves it again (tests/test_gpu_stack.py).\n"
              "# Install: pip install -e '.[gpu]' -c slurm/gpu-constraints.txt   (README: Install on a GPU cluster)\n")
    return header + "\n".join(lines) + "\n"


KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "bitsandbytes", "deepspeed",
                "gptqmodel", "numpy", "flashinfer-python", "triton")


def stack_summary(stack: dict[str, str]) -> str:
    """The count and the versions that matter most, in one line."""
    return f"{len(stack)} packages; " + ", ".join(f"{n} {stack[n]}" for n in KEY_PACKAGES if n in stack)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", nargs="+", default=list(PYTHONS), help="CPython versions (default: 3.11 3.12)")
    parser.add_argument("--write-constraints", action="store_true",
                        help=f"resolve without the constraints file and rewrite it ({CONSTRAINTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        stacks = resolve_stack(tuple(args.python), None if args.write_constraints else CONSTRAINTS)
    except ResolutionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for python, stack in stacks.items():
        print(f"CPython {python}, Linux x86-64: {stack_summary(stack)}")
    if args.write_constraints:
        CONSTRAINTS.write_text(constraints_text(stacks))
        print(f"wrote {CONSTRAINTS}")
    print(f"resolved in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
