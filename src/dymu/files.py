"""The user's files: atomic writes, advisory locks, output checks, and the fingerprints that tie a journal or an
output to the model and the image list it was made with.

* ``atomic_write``: the new content goes to a temporary file in the same folder, then ``os.replace`` puts it in
  place, so a failed write (full disk, ``ulimit -f``, a kill) leaves the old file whole. A symbolic link is
  replaced by a regular file (its target is never written through).
* ``Lock``: an advisory ``fcntl.flock`` on a sibling ``NAME.lock`` file holding the owner's pid; a second
  process fails at once with one line naming that pid. The lock file is removed when released (a stale one left
  by a killed process is harmless: the kernel released its lock).
* ``check_output``: an output that exists is refused unless overwriting is asked for, and an output that is one
  of the run's inputs is refused always.
* ``model_fingerprint``: a short hash of a module's config and of a sample of every parameter's bytes (cheap:
  ``WEIGHT_SAMPLES`` values per tensor), enough to tell two checkpoints or seeds of one architecture apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .vision import DymuError

#: suffix of the lock file next to a locked path
LOCK_SUFFIX = ".lock"
#: values sampled (evenly spaced) from each parameter tensor for the weights fingerprint
WEIGHT_SAMPLES = 256
#: hex digits kept of a fingerprint
FINGERPRINT_DIGITS = 16
#: config keys that do not change what a model computes (where it was loaded from, which release wrote it) or that
#: the weights fingerprint covers (the dtype: None in a model built in memory, "float32" once saved)
CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "architectures", "dymu", "dtype", "torch_dtype")


class FileInUseError(DymuError):
    """Another process holds the lock of a file this run wants to write."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """Permissions of a new regular file under the process's umask (0644 with the usual 022)."""
    return 0o666 & ~_umask()


def atomic_write(path, data: bytes | str) -> bool:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``. The file keeps its permissions
    (a new one gets the umask's). Returns True when ``path`` was a symbolic link, now replaced by a regular file."""
    path = Path(path)
    was_link = path.is_symlink()
    mode = default_mode() if was_link or not path.exists() else os.stat(path).st_mode & 0o7777
    payload = data.encode() if isinstance(data, str) else data
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return was_link


def atomic_write_json(path, data, indent: int | None = 1) -> bool:
    """``atomic_write`` of ``data`` as JSON and a final newline."""
    return atomic_write(path, json.dumps(data, indent=indent, allow_nan=True) + "\n")


def lock_path(path) -> Path:
    """``NAME.lock`` beside ``path`` (``.`` and ``..`` resolved first, so a folder given as ``.`` has a name)."""
    path = Path(os.path.abspath(path))
    return path.with_name(path.name + LOCK_SUFFIX)


class Lock:
    """Advisory exclusive lock of ``path`` (a file or folder that need not exist yet), held in ``with Lock(path):``.

    A second process (or a second ``Lock`` of the same path) raises ``FileInUseError`` naming the holder's pid."""

    def __init__(self, path, what: str | None = None):
        self.path = Path(path)
        self.what = what or str(path)
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        target = lock_path(self.path)
        while True:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, default_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                who = f"process {holder}" if holder else "another process"
                raise FileInUseError(f"{self.what} is in use by {who} (lock {target}): wait for it to finish") from None
            try:  # the holder we waited on may have removed the file: lock the one now in place
                same = os.stat(target).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(self.path))  # removed while still locked: nobody can lock the old inode after us
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _file_id(path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def check_output(path, option: str, overwrite: bool, inputs=(), resume: bool | None = None) -> Path:
    """An output file, checked before any work: not one of ``inputs`` (paths; the same file by any name, links
    followed), and absent unless ``overwrite`` (or ``resume``: continuing it is the caller's business; None: the
    command cannot continue an output). Returns it as a Path."""
    return check_outputs([path], option, overwrite, inputs, resume)[0]


def check_outputs(paths, option: str, overwrite: bool, inputs=(), resume: bool | None = None) -> list[Path]:
    """``check_output`` of several files written by one option (``--viz DIR``'s pictures); the inputs are looked
    at once, and only when one of the files exists."""
    outs = [Path(path) for path in paths]
    existing = [(out, _file_id(out)) for out in outs]
    existing = [(out, target) for out, target in existing if target is not None]  # no file yet: none of the inputs
    if not existing:
        return outs
    ids = {}
    for item in inputs:
        if item is not None:
            ids.setdefault(_file_id(item), item)
    for out, target in existing:
        if target in ids:
            raise DymuError(f"{option} {out} is one of this run's inputs ({ids[target]}): choose another file")
    if not (overwrite or resume):
        out = existing[0][0]
        options = "--resume to continue it, --overwrite to replace it" if resume is False else "--overwrite to replace it"
        raise DymuError(f"{option} {out} exists: pass {options}, or choose another file")
    return outs


def folder_files(folder) -> list[Path]:
    """The files directly in a folder (a model checkpoint's config, weights, processor), [] for a hub id."""
    folder = Path(str(folder)).expanduser()
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def fingerprint(data) -> str:
    """Short hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_DIGITS]


def list_fingerprint(names: list[str]) -> str:
    """Short hash of an ordered list of names (an image list)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:FINGERPRINT_DIGITS]


def model_fingerprint(module) -> dict:
    """{"config": hash, "weights": hash} of a module with a ``config`` (a vision tower, a whole VLM): its config
    without where it came from, and every parameter's name, shape, dtype and ``WEIGHT_SAMPLES`` evenly spaced
    values (their bytes)."""
    import torch

    config = getattr(module, "config", None)
    settings = config.to_dict() if config is not None else {}
    settings = {k: v for k, v in settings.items() if k not in CONFIG_KEYS_IGNORED and not k.startswith("_")}
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in module.state_dict().items():
            flat = parameter.detach().reshape(-1)
            step = max(1, flat.numel() // WEIGHT_SAMPLES)
            sample = flat[::step][:WEIGHT_SAMPLES].contiguous().cpu()
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return {"config": fingerprint(settings), "weights": digest.hexdigest()[:FINGERPRINT_DIGITS]}


#: what a difference in a fingerprint field means, for one-line refusals
FINGERPRINT_MEANING = {
    "config": "the model's config differs",
    "weights": "the model's weights differ (another checkpoint, seed or dtype)",
}


def fingerprint_mismatch(stored: dict | None, current: dict) -> str | None:
    """What differs between a stored ``model_fingerprint`` and the current one (None: nothing; a missing stored
    fingerprint is a difference: the file cannot be tied to this model)."""
    if not isinstance(stored, dict):
        return "it records no model fingerprint (written by an older dymu)"
    for key, meaning in FINGERPRINT_MEANING.items():
        if stored.get(key) != current.get(key):
            return meaning
    return None
