"""Atomic writes: build under a temporary name beside the target, rename into place at the end.

tempfile creates files 0600 and folders 0700 (private to the writer); what we rename into place
gets the permissions an ordinary open() or mkdir() would have given it under the current umask.
"""
import os
import shutil
import tempfile
from pathlib import Path


def _umask():
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting it,
    which briefly changes it for every thread, so that is the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_plain_file_mode(path):
    """chmod `path` to what open() gives under the umask (some writers, safetensors among them,
    create private 0600 files)."""
    os.chmod(path, 0o666 & ~_umask())


def make_temp_dir(target):
    """A new empty folder beside `target`, with a plain mkdir's permissions."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def write_file_atomically(path, write):
    """Call write(temporary_path), then rename it to `path`; on any failure remove it and re-raise,
    leaving an existing `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_plain_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(tmp, out_dir):
    """Rename tmp to out_dir; an existing out_dir is moved aside first, removed after."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, aside / "old")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(aside / "old", out_dir)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
