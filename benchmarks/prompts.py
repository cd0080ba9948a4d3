"""Offline prompt sets (shared/BENCHMARKS.md section 1): English technical prose, Python
source and licence text, all shipped with the OS or CPython, so benchmarks need no network.

Each prompt is `prompt_tokens` tokens cut from one document at a deterministic offset, so a
prompt set is reproducible from (set name, count, length, tokenizer).
"""
from __future__ import annotations

import pathlib
import sysconfig

LICENSE_DIR = pathlib.Path("/usr/share/common-licenses")


def _prose_documents() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics) if len(topics.topics[k]) > 4000]


def _code_documents() -> list[str]:
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 20000)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _licence_documents() -> list[str]:
    if not LICENSE_DIR.is_dir():
        raise FileNotFoundError(f"{LICENSE_DIR} is missing (Debian base-files provides it)")
    files = sorted(p for p in LICENSE_DIR.iterdir() if p.is_file() and not p.is_symlink()
                   and p.stat().st_size > 8000)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


PROMPT_SETS = {"prose": _prose_documents, "code": _code_documents, "licence": _licence_documents}


def prompt_set(name: str, count: int, prompt_tokens: int, tokenizer, skip: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `prompt_tokens` token ids from the set `name`.

    Documents are used in a fixed order; long documents give several prompts from windows spread
    over the text (beyond their first 10% to skip headers). `skip` drops the first prompts, so a
    calibration set can be disjoint from an evaluation set.
    """
    docs = PROMPT_SETS[name]()
    windows: list[list[int]] = []
    per_doc = max(1, -(-(count + skip) // len(docs)))
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        usable = len(ids) - prompt_tokens - 256  # leave room so text continues after the prompt
        if usable <= 0:
            continue
        for k in range(per_doc):
            start = usable // 10 + (usable * 9 // 10) * k // per_doc
            windows.append(ids[start:start + prompt_tokens])
    # interleave documents so a small count still spans many of them
    ordered = sorted(range(len(windows)), key=lambda i: (i % per_doc, i // per_doc))
    picked = [windows[i] for i in ordered][skip:skip + count]
    if len(picked) < count:
        raise ValueError(f"prompt set {name!r} has only {len(picked)} prompts of {prompt_tokens} tokens")
    return picked


__all__ = ["PROMPT_SETS", "prompt_set"]
