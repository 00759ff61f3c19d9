"""A lab shares one cluster: two real Unix users with a group in common, the prepared cache and the
results tree in a setgid group folder, umask 002 (README "A lab sharing a cache and results").
What the first writes is group-readable and group-writable, as open() and mkdir() make it; the
second runs status and aggregate on the first's sweep, prepares what the cache lacks (under the
cache's lock, created by the first), launches from the cache without writing to it and adds a
cell to the first's sweep; a sweep tree the second cannot write is refused, naming its owner.

CI runs as root: the test creates the users and the group (idempotently) and runs commands as
them. It needs root; under CI it fails instead of skipping without it."""
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # two smoke trainings: about a minute on 2 idle cores

REPO = Path(__file__).resolve().parent.parent
GROUP = "nligrpo_lab"
USERS = ("nligrpo_alice", "nligrpo_bob")
SWEEP = "lora_rank-smoke"
# Two optimizer steps on the warm-started tiny model, evaluated on two rows: what a cell writes
# (checkpoint, adapter, predictions, logs, result), in seconds.
QUICK = ["grpo.max_steps=2", "grpo.save_steps=2", "eval.limit=2", "data.local_dir=null"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _ensure_group_and_users() -> None:
    """The lab's group and two members, each with a private primary group (as useradd makes
    them): files are the lab's only where the setgid folder makes them so."""
    if not _exists(grp.getgrnam, GROUP):
        _run_or_recheck(["groupadd", GROUP], lambda: _exists(grp.getgrnam, GROUP))
    for user in USERS:
        if not _exists(pwd.getpwnam, user):
            _run_or_recheck(["useradd", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                             "--groups", GROUP, user], lambda user=user: _exists(pwd.getpwnam, user))
        if user not in grp.getgrnam(GROUP).gr_mem:
            subprocess.run(["usermod", "--append", "--groups", GROUP, user], check=True)


def _exists(lookup, name) -> bool:
    try:
        lookup(name)
        return True
    except KeyError:
        return False


def _run_or_recheck(argv, exists) -> None:
    """Run a user/group command; another test session creating the same name at once is fine."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0 and not exists():
        pytest.fail(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _traversable_for_all(paths) -> dict[Path, int]:
    """Give 'others' search (x) permission on every folder above `paths` that lacks it (this
    interpreter and the checkout often live under /root or tox's 0700 .tox), so that the lab's
    users can run this venv's python; returns the original modes, restored after the test."""
    changed = {}
    for path in paths:
        for folder in [*reversed(Path(path).resolve().parents), Path(path).resolve()]:
            mode = folder.stat().st_mode
            if folder.is_dir() and not mode & stat.S_IXOTH and folder not in changed:
                changed[folder] = stat.S_IMODE(mode)
                folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    return changed


@pytest.fixture(scope="module")
def lab():
    """The users, the lab's setgid folder (`shared`: root:nligrpo_lab, 2775) with nothing in it,
    a private home per user, and `run(user, *argv, umask=0o002)` running a command as that user
    with this venv's python first on PATH."""
    if os.geteuid() != 0:
        message = "the shared-lab test creates two Unix users and runs commands as them: it needs root"
        if _in_ci():
            pytest.fail(message + " (CI is set: CI runs as root, so this is an error)", pytrace=False)
        pytest.skip(message)
    _ensure_group_and_users()
    root = Path(tempfile.mkdtemp(prefix="nli_grpo_lab_"))
    root.chmod(0o755)
    shared = root / "shared"
    shared.mkdir()
    os.chown(shared, 0, grp.getgrnam(GROUP).gr_gid)
    shared.chmod(0o2775)
    members = {}
    for user in USERS:
        entry = pwd.getpwnam(user)
        home = root / user
        home.mkdir(mode=0o700)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        members[user] = SimpleNamespace(name=user, uid=entry.pw_uid, gid=entry.pw_gid, home=home,
                                        groups=os.getgrouplist(user, entry.pw_gid))
    restore = _traversable_for_all([sys.executable, sys.prefix, sys.base_prefix, REPO, root])

    def run(user: str, *argv, umask: int = 0o002, timeout: int = 300) -> subprocess.CompletedProcess:
        member = members[user]
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(member.home), "USER": user,
               "NLI_GRPO_CACHE": str(shared / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        return subprocess.run([str(a) for a in argv], user=member.uid, group=member.gid, extra_groups=member.groups,
                              umask=umask, env=env, cwd=member.home, capture_output=True, text=True, timeout=timeout)

    try:
        for user in USERS:
            probe = run(user, sys.executable, "-c", "import nli_grpo.sweep, torch")
            assert probe.returncode == 0, f"{user} cannot run this venv's python: {probe.stderr[-2000:]}"
        yield SimpleNamespace(root=root, shared=shared, cache=shared / "cache", results=shared / "results",
                              members=members, run=run, gid=grp.getgrnam(GROUP).gr_gid)
    finally:
        for folder, mode in reversed(list(restore.items())):
            folder.chmod(mode)
        shutil.rmtree(root, ignore_errors=True)


def originals(lab, name: str, stems: list[str]) -> Path:
    """A folder of the first user's downloads, readable by all: the shipped samples of `stems`."""
    folder = lab.root / name
    folder.mkdir(mode=0o755)
    for stem in stems:
        shutil.copy(REPO / "nli_grpo" / "samples" / f"{stem}.jsonl", folder / f"{stem}.jsonl")
        (folder / f"{stem}.jsonl").chmod(0o644)
    return folder


def sweep(lab, user: str, *argv) -> subprocess.CompletedProcess:
    """`python sweeps/lora_rank.py --smoke ... --results <shared results>` as `user`, run locally."""
    return lab.run(user, sys.executable, REPO / "sweeps" / "lora_rank.py", "--smoke", "--results", lab.results, *argv, *QUICK)


def private_entries(top: Path, gid: int) -> list[str]:
    """Everything under `top` that is not as umask 002 in the setgid group folder makes it:
    files rw for the group (0664, or 0775 when executable), folders 2775, all of the lab's group."""
    wrong = []
    for path in [top, *top.rglob("*")]:
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            ok = mode == 0o2775
        else:
            ok = mode in (0o664, 0o775)
        if not ok or info.st_gid != gid:
            wrong.append(f"{oct(mode)} {grp.getgrgid(info.st_gid).gr_name} {path.relative_to(top)}")
    return wrong


def snapshot(top: Path) -> dict[str, tuple]:
    return {str(p.relative_to(top)): (p.stat().st_uid, p.stat().st_mtime_ns, p.stat().st_size) for p in top.rglob("*")}


@pytest.fixture(scope="module")
def alices_sweep(lab):
    """The first user, umask 002: prepares the sets of the cells (not SNLI) from her downloads,
    then runs one cell of the smoke sweep, 2 steps, evaluated on ANLI R1 (the tiny-sft model is
    built into the shared cache by her job)."""
    downloads = originals(lab, "alice-downloads", ["anli_r1", "anli_train_r1"])
    prepared = lab.run("nligrpo_alice", sys.executable, "-m", "nli_grpo.prepare", "--from", downloads)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    done = sweep(lab, "nligrpo_alice", "--ranks", "8", "eval.benchmarks=[anli_r1]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (lab.results / SWEEP / "tiny-sft__bf16__r8__s0" / "adapter" / "adapter_model.safetensors").is_file()
    return lab.results / SWEEP


def test_everything_a_member_writes_under_umask_002_is_the_groups_to_read_and_write(lab, alices_sweep):
    """Cache (prepared data, its lock record and lock, the stand-in models) and results (result,
    config snapshot, manifest, train log, checkpoint, adapter, predictions, submitit's logs): all
    of it as open()/mkdir() under umask 002 make it, in the lab's group."""
    cell = alices_sweep / "tiny-sft__bf16__r8__s0"
    for written in [cell / "result.json", cell / "config.yaml", alices_sweep / "manifest.json", cell / "predictions",
                    cell / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors", lab.cache / "prepared.lock.json",
                    lab.cache / "data" / "anli_r1.jsonl", lab.cache / "models"]:
        assert written.exists(), written
    assert private_entries(lab.shared, lab.gid) == []


def test_a_second_member_reads_prepares_and_launches_from_the_firsts_cache_and_results(lab, alices_sweep):
    """status and aggregate read the first's sweep; `prepare` adds SNLI to her cache (taking the
    lock file she created, keeping her records); the sweep then adds a cell to her sweep,
    training on her cache's model and data without writing to the cache."""
    seen = lab.run("nligrpo_bob", sys.executable, "-m", "nli_grpo.status", alices_sweep)
    assert seen.returncode == 0 and "1 complete" in seen.stdout, seen.stdout + seen.stderr
    tables = lab.run("nligrpo_bob", sys.executable, "-m", "nli_grpo.aggregate", lab.results)
    assert tables.returncode == 0, tables.stdout + tables.stderr

    downloads = originals(lab, "bob-downloads", ["snli"])
    added = lab.run("nligrpo_bob", sys.executable, "-m", "nli_grpo.prepare", "--from", downloads)
    assert added.returncode == 0, added.stdout + added.stderr
    assert set(json.loads((lab.cache / "prepared.lock.json").read_text())["data"]) == {"anli_r1", "anli_train_r1", "snli"}

    cache_before = snapshot(lab.cache)
    done = sweep(lab, "nligrpo_bob", "--ranks", "8,16", "eval.benchmarks=[anli_r1]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skip: complete" in done.stdout  # her cell
    result = json.loads((alices_sweep / "tiny-sft__bf16__r16__s0" / "result.json").read_text())
    assert result["status"] == "complete" and set(result["eval"]) == {"anli_r1"}
    assert snapshot(lab.cache) == cache_before  # launched from the cache, wrote nothing into it
    submitters = [s["user"] for s in json.loads((alices_sweep / "manifest.json").read_text())["submissions"]]
    assert submitters == ["nligrpo_alice", "nligrpo_bob"]
    assert private_entries(lab.shared, lab.gid) == []


def test_rerunning_a_sweep_the_member_cannot_write_is_refused_naming_its_owner(lab, alices_sweep):
    """A tree written under umask 022 (here: made so by its owner) cannot take a second user's
    cells: the sweep refuses before queueing anything, says whose it is and what to do; so does
    a single cell folder she kept to herself."""
    cell = alices_sweep / "tiny-sft__bf16__r8__s0"
    locked_out = lab.run("nligrpo_alice", "chmod", "-R", "g-w", cell)
    assert locked_out.returncode == 0, locked_out.stderr
    try:
        refused = sweep(lab, "nligrpo_bob", "--ranks", "8", "--force", "eval.benchmarks=[anli_r1]")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        said = " ".join(refused.stdout.split())
        assert "nligrpo_alice" in said and "not writable by you (nligrpo_bob)" in said and "chmod -R g+w" in said, said
        assert "Nothing submitted" in said
        assert (cell / "result.json").is_file()  # not moved aside
    finally:
        lab.run("nligrpo_alice", "chmod", "-R", "g+w", cell)

    copy = lab.shared / "results-022"
    mkdir = lab.run("nligrpo_alice", "mkdir", "-p", copy, umask=0o022)
    assert mkdir.returncode == 0
    copied = lab.run("nligrpo_alice", "cp", "-r", alices_sweep, copy / SWEEP, umask=0o022)
    assert copied.returncode == 0, copied.stderr
    refused = lab.run("nligrpo_bob", sys.executable, REPO / "sweeps" / "lora_rank.py", "--smoke", "--results", copy,
                      "--ranks", "8,32", "eval.benchmarks=[anli_r1]", *QUICK)
    said = " ".join(refused.stdout.split())
    assert refused.returncode == 2 and "nligrpo_alice" in said and "not writable by you (nligrpo_bob)" in said, said
