"""The on-disk cache of converted models: where it lives, what counts as complete, and atomic publishing.

Layout under the cache root:
    <sha256[:12]>-<name>/         a complete model folder (only ever created by a rename)
    <sha256[:12]>-<name>/dyspec-model.json   manifest, written before that rename
    .tmp-<sha256[:12]>-<name>-*/  work in progress; never read, removed by the next fetch of that model
    .lock-<sha256[:12]>-<name>    serialises fetches of one model across processes
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from model_store.registry import ModelSpec

MANIFEST = "dyspec-model.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else $DYSPEC_CACHE, else $XDG_CACHE_HOME/dyspec/models (~/.cache by default)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DYSPEC_CACHE"):
        return Path(os.environ["DYSPEC_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "dyspec" / "models"


def model_dir(root: Path, spec: ModelSpec) -> Path:
    return root / spec.cache_key


def is_complete(folder: Path) -> bool:
    # The manifest is written last inside the temp folder and the folder appears by rename,
    # so a folder with a manifest is whole; one without is foreign and is not trusted.
    return (folder / MANIFEST).is_file()


@contextlib.contextmanager
def model_lock(root: Path, spec: ModelSpec) -> Iterator[None]:
    """Hold an exclusive lock for `spec` under `root`, so two processes never build the same model at once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{spec.cache_key}", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def remove_stale_work(root: Path, spec: ModelSpec) -> None:
    """Delete work folders left by interrupted fetches of `spec`. Call only while holding model_lock."""
    for stale in root.glob(f".tmp-{spec.cache_key}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(built: Path, final: Path, manifest: dict) -> None:
    """Write the manifest into `built`, then rename it to `final` in one step."""
    (built / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # save_pretrained and mkdtemp create owner-only files; a model cache is fine to share read-only.
    built.chmod(0o755)
    for item in built.iterdir():
        if item.is_file():
            item.chmod(0o644)
    os.rename(built, final)
