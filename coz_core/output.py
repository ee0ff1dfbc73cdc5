"""Where ``coz-zoom`` and ``coz-upscale`` write, checked before any compute, and each input's
results written atomically.

- One folder per input, named after its stem (``photo.png`` -> ``OUT/photo/``). When two inputs of
  one run share a stem (``photo.png`` and ``photo.jpg``), each gets its stem and suffix instead
  (``OUT/photo_png/``, ``OUT/photo_jpg/``), and a number after that if still shared
  (``a/photo.png``, ``b/photo.png`` -> ``photo_png``, ``photo_png_2`` in input order).
- An input's folder that exists already is refused unless ``overwrite``; then it is replaced as
  a whole (never merged: no stale ``scale_4.png`` beside a 2-step manifest).
- Results go to a hidden temporary folder beside the final one and are renamed into place
  only once complete, so a failure (a full disk, a crash) leaves nothing half-made.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence


class OutputError(ValueError):
    """The output location cannot take the results (explained in the message)."""


def folder_names(inputs: Sequence[Path]) -> list[str]:
    """One distinct output folder name per input, in input order (see the module docstring)."""
    stems = [p.stem for p in inputs]
    names = [s if stems.count(s) == 1 else f"{s}_{p.suffix.lstrip('.').lower()}" for s, p in zip(stems, inputs)]
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        while candidate.lower() in taken:  # lower: folders collide on case-insensitive disks too
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate.lower())
        unique.append(candidate)
    return unique


def check_output(root: Path, names: Sequence[str], overwrite: bool = False) -> None:
    """Refuse, before any compute, an output ``root`` that cannot take the folders ``names``:
    a file (or a path under one), a folder this user cannot write, or result folders that
    exist already (unless ``overwrite``)."""
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == root else f"is under a file ({parent})"
                raise OutputError(f"output {root} {what}; choose a folder with -o")
            break
    existing = parent  # the nearest folder that exists: root itself or where it will be made
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {existing}: permission denied; choose another folder with -o")
    try:  # access() can say yes where the filesystem says no (read-only mounts, ACLs)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise OutputError(f"cannot write to {existing}: {exc.strerror or exc}; choose another folder with -o") from None
    if not overwrite:
        clash = [n for n in names if (root / n).exists()]
        if clash:
            shown = ", ".join(str(root / n) for n in clash[:3]) + (" ..." if len(clash) > 3 else "")
            raise OutputError(f"results exist already: {shown}; pass --overwrite to replace them, "
                              "or choose another folder with -o")


def write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a fresh temporary folder beside ``folder``, then put it in
    ``folder``'s place (replacing an existing one as a whole). On any error the temporary
    folder is removed and ``folder`` is left as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        write(tmp)
        if folder.exists():
            old = folder.with_name(f"{tmp.name[:-len('.partial')]}.old")
            folder.rename(old)
        try:
            tmp.rename(folder)
        except OSError:
            if old is not None:
                old.rename(folder)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
