"""What scoremerge may read and write: the one place that decides, used by every path (in-memory
and streaming merges, side files, resume, distributed ranks). The README's "Safety" section
says the same for users.

Reading. A path the user names (--base, --experts, a config's paths) is opened as given, through
symlinks: the user chose it. A file that a checkpoint folder names for itself (its weights,
its index's shards, the side files copied to the output) must be a plain file name that
resolves, through any symlinks, to a regular file inside the folder; or, when the folder is a
Hugging Face cache snapshot (`models--org--name/snapshots/<revision>/`, or a folder inside one),
inside that repository's `blobs/`, where the hub keeps what its snapshot links point to. Anything else is
refused by name, without opening it.

Writing. The output folder may not be, contain or sit inside an input. It is built in a hidden
folder beside it and renamed into place; while a run writes it holds a lock beside the output,
so a second run into the same folder refuses at once. --overwrite replaces only a folder that a
previous merge wrote: scoremerge's metadata in its weights lists every file it wrote, and the
folder holds nothing else.
"""
import fcntl
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from ..errors import MergeInputError, shown
from .safetensors_format import read_header

INDEX_NAME = "model.safetensors.index.json"
# Files of a base model folder copied beside the merged weights (configs, tokenizers).
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
MARKER_KEY = "scoremerge_version"        # in every file a merge writes (safetensors metadata)
FILES_KEY = "scoremerge_files"           # beside it: the names of every file the merge wrote


def member(folder, name, what):
    """The real path of the file `name` that checkpoint folder `folder` names for itself (`what`
    it is, for messages); it may not exist (the caller names a missing file)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise MergeInputError(f"{folder}: {what} {shown(name)} is not a plain file name; a "
                              "checkpoint may name only files in its own folder")
    path = Path(folder) / name
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:         # RuntimeError: a symlink loop (Python < 3.13)
        raise MergeInputError(f"{path}: cannot resolve: {e}") from None
    if not any(real.is_relative_to(root) for root in _roots(folder)):
        raise MergeInputError(f"{path}: links to {real}, outside the checkpoint folder; refused "
                              "(a checkpoint's files must lie in its folder, or in the blobs/ "
                              "of the Hugging Face cache it belongs to)")
    if os.path.lexists(path) and not real.is_file():
        raise MergeInputError(f"{path}: {what} is not a regular file")
    return real


def _roots(folder):
    """The folder, and the cache's blobs/ when the folder is, or lies in, a snapshot revision
    (diffusers keeps its models in subfolders of one: snapshots/<rev>/text_encoder/)."""
    real = Path(folder).resolve()
    for revision in (real, *real.parents):
        blobs = revision.parent.parent / "blobs"
        if revision.parent.name == "snapshots" and blobs.is_dir():
            return [real, blobs]
    return [real]


def side_files(folder, weight_names):
    """(files to copy, {name: why not}) from a base model folder: configs and tokenizers, by
    suffix, never the weights, never through a link that leaves the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], {}
    files, skipped = [], {}
    for path in sorted(folder.iterdir()):
        if path.name in weight_names or path.suffix not in SIDE_FILE_SUFFIXES:
            continue
        try:
            real = member(folder, path.name, "side file")
        except MergeInputError as e:
            skipped[path.name] = str(e)
            continue
        if real.is_file():
            files.append((path.name, real))
    return files, skipped


def copy_side_file(real, dest):
    """Copy the regular file `real` to the new file `dest`; neither end through a symlink."""
    src = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise MergeInputError(f"{real}: not a regular file; not copied")
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o666)
        try:
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def check_output(out, inputs):
    """Refuse an output folder that is, contains or sits inside any input file or folder."""
    out_real = Path(out).resolve()
    for given in inputs:
        real = Path(given).resolve()
        if out_real == real or out_real in real.parents or real in out_real.parents:
            relation = "is" if out_real == real else "contains" if out_real in real.parents \
                else "is inside"
            raise MergeInputError(f"{out}: the output {relation} the input {given}; a merge "
                                  "never writes over, around or into what it reads")


def check_replaceable(out, overwrite):
    """Raise before any work unless `out` is absent, an empty folder, or (with overwrite) a
    folder a previous merge wrote."""
    out = Path(out)
    if out.is_symlink():
        raise MergeInputError(f"{out}: is a symlink; give the folder it points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise MergeInputError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise MergeInputError(f"{out}: folder exists and is not empty (pass overwrite / "
                              "--overwrite to replace it)")
    why_not = _not_a_previous_output(out)
    if why_not:
        raise MergeInputError(f"{out}: --overwrite replaces only a folder a previous scoremerge "
                              f"merge wrote, and {why_not}; choose another output folder, or "
                              "empty this one yourself")


def _not_a_previous_output(folder):
    """None when `folder` holds only files a merge wrote there, as its weights' metadata lists
    them (FILES_KEY); else what it holds that no merge wrote."""
    recorded = _recorded_files(folder)
    if recorded is None:
        return "its weights do not carry scoremerge's metadata"
    for path in folder.iterdir():
        if path.is_symlink() or not path.is_file():
            return f"it holds {shown(path.name)}, which is not a regular file"
        if path.name not in recorded:
            return f"it holds {shown(path.name)}, which the merge did not write"
    return None


def is_weight_file(name):
    return name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors"))


def _recorded_files(folder):
    """The file names a merge recorded writing into `folder`, or None if none did."""
    try:
        if (folder / INDEX_NAME).is_file():
            meta = json.loads((folder / INDEX_NAME).read_text()).get("metadata", {})
        else:
            path = folder / "model.safetensors"
            with open(path, "rb") as f:
                meta = read_header(f, os.fstat(f.fileno()).st_size, path)[1]
        files = json.loads(meta[FILES_KEY]) if MARKER_KEY in meta else None
        return set(files) if isinstance(files, list) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def check_own_partial(partial):
    """A leftover build folder is removed or resumed only when it is a real folder holding what
    a merge writes there (its shards, their temporary files, progress records)."""
    if partial.is_symlink() or not partial.is_dir():
        raise MergeInputError(f"{partial}: is not a folder scoremerge made; remove it yourself")
    for path in partial.iterdir():
        own = path.name.startswith(".") and path.name.endswith((".partial", ".tmp")) \
            or is_weight_file(path.name) or path.suffix in SIDE_FILE_SUFFIXES
        if path.is_symlink() or not path.is_file() or not own:
            raise MergeInputError(f"{partial}: holds {shown(path.name)}, which a merge does not "
                                  "write there; remove the folder yourself")


@contextmanager
def output_lock(out):
    """Held while a run writes `out` and its build folder: a second run refuses at once."""
    out = Path(out)
    path = out.parent / f".{out.name}.scoremerge-lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergeInputError(f"{out}: another scoremerge run is writing it (it holds "
                                  f"{path.name}); wait for it to end, or choose another output "
                                  "folder") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)       # the run that held it removed it as we opened it: take a fresh one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
