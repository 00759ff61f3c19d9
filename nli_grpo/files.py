"""How the package creates files, so that a lab can share one prepared cache and one results tree
in a group folder (README "A lab sharing a cache and results"):

- Every file and folder follows the process umask, as open() and mkdir() make them: the atomic
  writes' temporary files and folders included (`tempfile.mkstemp` / `mkdtemp` always make them
  0600 / 0700), and files that libraries write private (safetensors: 0600) are brought back to it
  (`follow_umask`).
- Lock files can be taken by everyone who may write their folder (`locked`).
- A tree another user cannot write is named with its owner before anything is written into it
  (`not_writable_problem`).

Light (no package imports): the cache, the lowest layer, uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import secrets
import stat
from pathlib import Path

#: What open() asks the kernel for before the umask: rw for all (rwx for folders).
FILE_MODE, FOLDER_MODE = 0o666, 0o777
_EXECUTABLE = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
_GROUP_RW = stat.S_IRGRP | stat.S_IWGRP


def umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status); elsewhere set and
    restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def new_temp_file(folder: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, empty file with a random name in `folder`, opened for writing: (descriptor, path).
    Like tempfile.mkstemp, but created as open() creates files (0666 less the umask, a default
    ACL applies), so that renamed into place it is what open() would have made."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE), path
        except FileExistsError:
            continue


def new_temp_folder(folder: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """A new, empty folder with a random name in `folder`. Like tempfile.mkdtemp, but created as
    mkdir() creates folders (0777 less the umask; the setgid bit of a group folder inherited)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            path.mkdir(FOLDER_MODE)
            return path
        except FileExistsError:
            continue


def follow_umask(top: str | os.PathLike) -> None:
    """Give `top` and everything under it the mode open() / mkdir() would have given it under the
    process umask: for what a library wrote with a fixed private mode (safetensors writes 0600
    whatever the umask). Executable files stay executable; folders keep their setgid bit."""
    mask = umask()
    top = Path(top)
    for path in [top, *top.rglob("*")] if top.is_dir() else [top]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        if stat.S_ISDIR(info.st_mode):
            wanted = (FOLDER_MODE & ~mask) | (info.st_mode & stat.S_ISGID)
        else:
            wanted = ((FOLDER_MODE if info.st_mode & stat.S_IXUSR else FILE_MODE) & ~mask)
        if stat.S_IMODE(info.st_mode) != wanted:
            path.chmod(wanted)


class NotWritableError(PermissionError):
    """A file or folder of another user this one cannot write; the message names both and the fix."""


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on the file `path` (created if missing) while the block runs.

    The lock file is created as open() would create it and, when its folder is group-writable,
    made group-writable too: whoever may write the folder may take the lock, whatever the umask
    of the one who created it. It is opened for writing because NFS implements flock() with
    byte-range locks, which need a descriptor open for writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except PermissionError:
        raise NotWritableError(not_writable_problem(path) or f"lock file {path}: permission denied") from None
    try:
        info = os.fstat(fd)
        if (info.st_uid == os.geteuid() and path.parent.stat().st_mode & stat.S_IWGRP
                and info.st_mode & _GROUP_RW != _GROUP_RW):
            os.fchmod(fd, stat.S_IMODE(info.st_mode) | _GROUP_RW)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def not_writable(top: str | os.PathLike, tree: bool = True) -> Path | None:
    """The first of `top` and (with `tree`) everything under it that this user cannot write
    (folders: write and enter), or None when all of it can be written or `top` is missing."""
    top = Path(top)
    if not top.exists():
        return None
    for path in [top, *top.rglob("*")] if tree and top.is_dir() else [top]:
        info = path.lstat()
        needs = os.W_OK | (os.X_OK if stat.S_ISDIR(info.st_mode) else 0)
        if not stat.S_ISLNK(info.st_mode) and not os.access(path, needs):
            return path
    return None


def not_writable_problem(top: str | os.PathLike, what: str | None = None, tree: bool = True) -> str | None:
    """Why this user cannot write `top` (with `tree`: all under it too), naming the owner of the
    first thing in the way, its group and mode, and the fix; None when it can. `what` names `top`
    in the message."""
    blocked = not_writable(top, tree)
    if blocked is None:
        return None
    info = blocked.stat()
    owner, group = _name(pwd.getpwuid, info.st_uid), _name(grp.getgrgid, info.st_gid)
    member = info.st_gid in os.getgroups() or info.st_gid == os.getegid()
    change = f"chmod -R g+w {top}" if Path(top).is_dir() else f"chmod g+w {top}"
    fix = (f"ask {owner} to run `{change}`" if member else
           f"ask {owner} to share it with a group you are in (`chgrp -R <group> {top}`, then `{change}`)")
    return (f"{what or top}: {blocked} belongs to {owner} ({owner}:{group}, mode {stat.S_IMODE(info.st_mode):04o}) "
            f"and is not writable by you ({_name(pwd.getpwuid, os.geteuid())}): {fix}; a lab writes its shared folders under "
            "umask 002 (README: A lab sharing a cache and results)")


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)
