"""Reading deploy/docker/*.Dockerfile: their instructions and the module each ENTRYPOINT runs
(the manifests' tests map an image to its service through it)."""
from __future__ import annotations

import json
import re
from pathlib import Path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def entry_module(path: Path) -> str:
    argv = json.loads(next(args for op, args in instructions(path) if op == "ENTRYPOINT"))
    assert argv[:2] == ["python", "-m"], f"{path.name}: ENTRYPOINT should be `python -m <module>`, got {argv}"
    return argv[2]
