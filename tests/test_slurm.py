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


def test_a_pending_job_carries_its_reason_and_what_to_do_when_it_waits_for_a_person():
    jobs = slurm.parse_squeue(recorded("squeue_held.txt"))  # scontrol requeuehold, hold (as root), sbatch --hold, queued
    assert jobs == {"3": "PENDING", "4": "PENDING", "5_0": "PENDING", "5_1": "PENDING", "6": "PENDING"}
    assert jobs["3"].reason == "job requeued in held state" and "scontrol release 3" in jobs["3"].action
    assert "administrator" in jobs["4"].action and "scontrol release 5_1" in jobs["5_1"].action
    assert (jobs["6"].reason, jobs["6"].action) == ("Priority", "")  # waits its turn
    # the forms of limits it can never meet, as larger clusters print them
    never = slurm.parse_squeue("7|PENDING|QOSMaxWallDurationPerJobLimit\n8|PENDING|ReqNodeNotAvail, UnavailableNodes:gpu[01-02]\n")
    assert "ask for a QOS that allows it" in never["7"].action and "sinfo -R" in never["8"].action


def test_sacct_lists_the_tasks_of_an_array_cancelled_before_they_started():
    states = slurm.parse_sacct(recorded("sacct_array_cancelled.txt"))
    assert states["37_0"] == "COMPLETED" and states["37_1"] == states["37_3"] == "CANCELLED by 0"
    assert states["5"] == "CANCELLED by 0"  # cancelled whole while pending: one line, its base id
    assert slurm.parse_sacct("9_[0-4:2,7]|CANCELLED by 0\n").keys() == {"9", "9_0", "9_2", "9_4", "9_7"}


def test_a_job_being_preempted_is_told_from_one_being_cancelled():
    # `scontrol show job -o` as a job's step read it on its SIGTERM: preempted by partition urgent
    # (GraceTime 60), and cancelled with scancel
    assert slurm.parse_being_preempted(recorded("scontrol_job_preempted.txt"))
    assert not slurm.parse_being_preempted(recorded("scontrol_job_cancelled.txt"))
    assert not slurm.parse_being_preempted("JobId=5 JobState=RUNNING PreemptTime=None")
