"""File modes on a shared file system, in one process (the two-user flow is in test_shared_lab):
atomic writes and the files libraries write private follow the umask as open() would, and lock
files can be taken by the group of a group-writable folder."""
import contextlib
import os
import stat

import pytest

from nli_grpo import cache, files, results


@contextlib.contextmanager
def process_umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077], ids=["002", "022", "077"])
def test_atomic_writes_get_the_mode_open_gives_under_the_umask(tmp_path, mask):
    with process_umask(mask):
        assert files.umask() == mask
        results.atomic_write_json(tmp_path / "result.json", {"a": 1})
        with results.atomic_open(tmp_path / "predictions.jsonl.gz", "wb") as f:
            f.write(b"x")
        with open(tmp_path / "plain.txt", "w"):
            pass
        folder = files.new_temp_folder(tmp_path, prefix=".model.")
    assert mode(tmp_path / "result.json") == mode(tmp_path / "predictions.jsonl.gz") == mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert mode(folder) == 0o777 & ~mask
    assert {p.name for p in tmp_path.iterdir()} == {"result.json", "predictions.jsonl.gz", "plain.txt", folder.name}  # no temp file left


def test_files_a_library_writes_private_are_brought_to_the_umask_keeping_setgid(tmp_path):
    """safetensors writes 0600 whatever the umask; a setgid folder keeps its bit."""
    import numpy
    from safetensors.numpy import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter.chmod(0o2700)
    script = adapter / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    with process_umask(0o002):
        save_file({"w": numpy.zeros(2)}, str(adapter / "adapter_model.safetensors"))
        assert mode(adapter / "adapter_model.safetensors") == 0o600
        files.follow_umask(adapter)
    assert mode(adapter / "adapter_model.safetensors") == 0o664
    assert mode(script) == 0o775
    assert mode(adapter) == 0o2775


@pytest.mark.parametrize(("folder_mode", "lock_mode"), [(0o2775, 0o664), (0o755, 0o644)], ids=["group-folder", "private-folder"])
def test_a_lock_file_is_the_groups_when_its_folder_is(tmp_path, monkeypatch, folder_mode, lock_mode):
    """Created under umask 022 by one member, the cache's lock can still be taken by the others
    when the cache folder is group-writable (and only then is it made group-writable)."""
    monkeypatch.setenv("NLI_GRPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(folder_mode)
    with process_umask(0o022), cache.locked():
        pass
    assert mode(tmp_path / "cache" / f".{cache.LOCK_FILENAME}.flock") == lock_mode
