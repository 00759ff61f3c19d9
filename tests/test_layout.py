"""The cell folder: its names, checkpoint discovery (complete only with the marker), removing torn
checkpoints, copying the adapter out of a checkpoint, and moving a run aside."""
from nli_grpo.layout import (
    COMPLETE_MARKER,
    REPLACED_DIRNAME,
    CellFolder,
    adapter_from_checkpoint,
    checkpoint_step,
    mark_checkpoint_complete,
)


def checkpoint(folder: CellFolder, step: int, complete: bool = True):
    path = folder.checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "optimizer.pt",
                 "trainer_state.json", "rng_state.pth"):
        (path / name).write_text(f"{name} of step {step}")
    if complete:
        mark_checkpoint_complete(path, step)
    return path


def test_only_checkpoints_with_the_marker_count_and_steps_sort_as_numbers(tmp_path):
    folder = CellFolder(tmp_path / "cell")
    assert folder.last_checkpoint() is None and folder.last_step_on_disk() == 0
    for step in (8, 10, 9):
        checkpoint(folder, step)
    torn = checkpoint(folder, 11, complete=False)
    (folder.checkpoints / "checkpoint-final").mkdir()  # not a step: ignored
    assert [checkpoint_step(p) for p in folder.complete_checkpoints()] == [8, 9, 10]
    assert folder.last_step_on_disk() == 10 and (folder.last_checkpoint() / COMPLETE_MARKER).read_text() == "10\n"
    assert folder.remove_incomplete_checkpoints() == [torn] and not torn.exists()
    assert checkpoint_step("checkpoint-12") == 12 and checkpoint_step("checkpoint-x") is None


def test_the_adapter_of_a_checkpoint_without_the_trainers_state(tmp_path):
    folder = CellFolder(tmp_path / "cell")
    adapter_from_checkpoint(checkpoint(folder, 4), folder.adapter)
    assert sorted(p.name for p in folder.adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert (folder.adapter / "adapter_model.safetensors").read_text() == "adapter_model.safetensors of step 4"


def test_moving_a_run_aside_keeps_all_of_it_out_of_the_way(tmp_path):
    folder = CellFolder(tmp_path / "sweep" / "cell")
    checkpoint(folder, 2)
    folder.result.write_text("{}")
    moved = folder.move_aside()
    assert moved.parent == tmp_path / "sweep" / REPLACED_DIRNAME and moved.name.startswith("cell.")
    assert (moved / "result.json").exists() and (moved / "checkpoints" / "checkpoint-2").is_dir()
    assert not folder.path.exists()


def test_every_name_of_the_folder(tmp_path):
    folder = CellFolder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (
        folder.result, folder.train_log, folder.adapter, folder.checkpoints, folder.rollout_adapters,
        folder.config_snapshot, folder.predictions("anli_r1"))] == [
        "result.json", "train_log.jsonl", "adapter", "checkpoints", "rollout_adapters", "config.yaml",
        "predictions/anli_r1.jsonl.gz"]


def test_the_checkpoints_files_are_on_disk_before_its_marker(tmp_path, monkeypatch):
    """A crash (a node losing power) must not leave a marker on a checkpoint whose data is still in
    the page cache: every file, and the folders naming them, is fsynced before the marker is."""
    import os

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    folder = CellFolder(tmp_path / "cell")
    path = checkpoint(folder, 3, complete=False)
    (path / "global_step3").mkdir()  # e.g. a deepspeed/FSDP shard folder
    (path / "global_step3" / "shard.pt").write_text("shard")
    mark_checkpoint_complete(path, 3)
    marker = str(path / COMPLETE_MARKER)
    assert marker in synced
    before = set(synced[:synced.index(marker)])
    data = {str(p) for p in path.rglob("*") if p.name != COMPLETE_MARKER}
    assert data | {str(path)} <= before, sorted(data | {str(path)} - before)
    assert synced[-1] == str(path)  # the marker's own folder entry too
