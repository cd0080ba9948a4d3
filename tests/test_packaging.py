"""pyproject.toml and requirements.lock pin the same set: bootstrap installs the lock, pip reads the pyproject."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_pins_exactly_what_the_lock_pins():
    lock = {
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.split("#")[0].strip()
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [dep for extra in project["optional-dependencies"].values() for dep in extra]

    assert all("==" in requirement for requirement in lock), "every lock line must be an exact pin"
    assert len(declared) == len(set(declared)), "a requirement is declared twice"
    assert set(declared) == lock
