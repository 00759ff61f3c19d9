"""A sweep's manifest: every submission kept, the latest job of each cell, a corrupt file named."""
import sys

import pytest

from nli_grpo import manifest
from nli_grpo.layout import MANIFEST_FILENAME


class Job:
    def __init__(self, job_id):
        self.job_id = job_id


def test_manifest_keeps_every_submission_and_the_latest_job_of_each_cell(tmp_path):
    manifest.record_submission(tmp_path, {"a": {"cell": 1}, "b": {"cell": 2}},
                               manifest.submission_record("slurm", tmp_path, {"a": Job("7_0"), "b": Job("7_1")}, retries=2))
    manifest.record_submission(tmp_path, {"b": {"cell": 2}}, manifest.submission_record("slurm", tmp_path, {"b": Job("9")}, retries=0))
    found = manifest.read_manifest(tmp_path)
    assert list(found["cells"]) == ["a", "b"] and len(found["submissions"]) == 2
    first = found["submissions"][0]
    assert first["command"][0] == sys.executable and "submitted_at" in first and first["retries"] == 2
    assert manifest.latest_jobs(found) == {"a": ("7_0", "slurm"), "b": ("9", "slurm")}
    (tmp_path / MANIFEST_FILENAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*move it aside"):
        manifest.read_manifest(tmp_path)
