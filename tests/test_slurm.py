"""What Slurm says, parsed: on output recorded from a real cluster (the local one of slurm/,
tests/recorded/slurm/), and on the forms larger clusters print (typed GRES, mixed nodes)."""
from pathlib import Path

import pytest

from nli_grpo import slurm
from nli_grpo.config import ResourcesConfig

RECORDED = Path(__file__).parent / "recorded" / "slurm"


def recorded(name: str) -> str:
    return (RECORDED / name).read_text()


def test_squeue_lists_array_tasks_one_by_one_with_their_state():
    jobs = slurm.parse_squeue(recorded("squeue.txt"))
    assert jobs == {"86_0": "RUNNING", "86_1": "RUNNING", "86_2": "RUNNING", "87": "RUNNING", "88": "PENDING",
                    "85": "BLOCKED"}  # pending on a job that failed: it would never run
    # a job that left the queue (or a state that means it did) is not queued
    assert slurm.parse_squeue("7|COMPLETED|None\n8|FAILED|None\n9_1|REQUEUED|None\n") == {"9_1": "REQUEUED"}


def test_sacct_keeps_whole_states():
    states = slurm.parse_sacct(recorded("sacct.txt"))
    assert states["36"] == "COMPLETED" and states["40"] == "FAILED" and states["41"] == "CANCELLED by 0"
    assert states["39_2"] == "RUNNING"


def test_partitions_and_the_default_one():
    assert slurm.parse_partitions(recorded("sinfo_partitions.txt")) == (["gpu", "cpu", "urgent"], "gpu")
    assert slurm.parse_partitions("a\nb\n") == (["a", "b"], None)


def test_node_resources_from_gres_memory_and_cpus():
    assert slurm.parse_node_resources(recorded("sinfo_gpu.txt")) == {"gpus_per_node": 4, "mem_gb": 23081 / 1024, "cpus_per_node": 8}
    mixed = "gpu:a100:8(S:0-1)|1024000+|128+\ngpu:h100:4,mps:400|512000|64\n(null)|256000|32\n"
    assert slurm.parse_node_resources(mixed) == {"gpus_per_node": 8, "mem_gb": 1000.0, "cpus_per_node": 128}


def test_partition_limits():
    assert slurm.parse_partition_limits(recorded("scontrol_partition_gpu.txt")) == {"max_time_min": None, "grace_time_s": 60}
    assert slurm.parse_partition_limits("MaxTime=2-00:00:00 GraceTime=0") == {"max_time_min": 2880, "grace_time_s": 0}


def test_max_array_size():
    assert slurm.parse_max_array_size(recorded("scontrol_config.txt")) == 1001
    assert slurm.parse_max_array_size("MaxArraySize            = 40001\n") == 40001
    assert slurm.parse_max_array_size("") == 1001


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("30:00", 30), ("2-00:00:00", 2880), ("1-12", 2160), ("0:10:30", 11)])
def test_slurm_time_formats(text, minutes):
    assert slurm.parse_time_min(text) == minutes


def test_a_request_the_partition_cannot_hold_is_named():
    facts = {"name": "gpu", "gpus_per_node": 4, "mem_gb": 22.5, "cpus_per_node": 8, "max_time_min": 60, "grace_time_s": 60}
    problems = slurm.resource_problems(ResourcesConfig(gpus_per_node=8, cpus_per_task=16, mem_gb=64, timeout_min=120), facts)
    assert [p.split(";")[0] for p in problems] == [
        "asks for 8 GPUs per node", "asks for 16 CPUs", "asks for 64 GB of memory", "asks for 120 min"]
    assert slurm.resource_problems(ResourcesConfig(gpus_per_node=1, cpus_per_task=2, mem_gb=8, timeout_min=30), facts) == []


def test_a_missing_command_says_where_to_run():
    with pytest.raises(slurm.SlurmError, match="not found: run on a Slurm login node"):
        slurm.run_command("no-such-slurm-command-xyz")
