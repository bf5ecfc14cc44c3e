"""The `flashport` command: `env`, `init-tiny`, `generate`, `serve`.

Heavy modules (torch, the model) are imported inside the subcommands so `flashport --help` is fast.
A `FlashportError` (bad input) is printed as one `error: ...` line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from flashport.errors import FlashportError

GIB = 1024**3


def _cmd_env(args: argparse.Namespace) -> int:
    from flashport.platform import detect_platform

    p = detect_platform(args.device)
    rows = [
        ("backend", p.backend),
        ("device", p.device_name),
        ("arch", p.arch),
        ("triton target", p.triton_target or "-"),
        ("fp8", p.fp8_flavour),
        ("memory total", f"{p.total_memory_bytes / GIB:.1f} GiB"),
        ("memory free", f"{p.free_memory_bytes / GIB:.1f} GiB"),
        ("torch", p.torch_version),
        ("triton", p.triton_version or "not installed"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")
    return 0


def _cmd_init_tiny(args: argparse.Namespace) -> int:
    from flashport.model.tiny import write_tiny_checkpoint

    out = Path(args.dir)
    write_tiny_checkpoint(out, seed=args.seed)
    print(f"wrote tiny checkpoint (seed {args.seed}) to {out}:")
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {f.relative_to(out)}  ({f.stat().st_size:,} bytes)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.thinking and not args.chat:
        raise FlashportError("--thinking needs --chat (it selects the chat template's thinking mode)")
    if args.max_tokens < 1:
        raise FlashportError(f"--max-tokens must be at least 1, got {args.max_tokens}")

    from flashport.llm import LLM
    from flashport.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        num_layers=args.num_layers,
        dequantize=args.dequantize,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cache_bytes=args.cache_bytes,
        ops_impl=args.ops_impl,
        expert_parallel_size=args.expert_parallel_size,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        overlap=False if args.no_overlap else None,
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    t1 = time.perf_counter()
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, thinking=args.thinking)
    else:
        outputs = llm.generate([args.prompt], params)
    elapsed = time.perf_counter() - t1

    out = outputs[0]
    n_prompt = len(out.prompt_token_ids)
    n_gen = len(out.outputs[0].token_ids)
    print(out.outputs[0].text)
    rate = n_gen / elapsed if elapsed > 0 else float("inf")
    print(
        f"[prompt {n_prompt} tokens, generated {n_gen} tokens in {elapsed:.2f} s, "
        f"{rate:.1f} tokens/s; load {t1 - t0:.2f} s]"
    )
    return 0


DEFAULT_SERVE_MODEL = Path("models/tiny")


def _cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise FlashportError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting < 1:
        raise FlashportError(f"--max-waiting must be at least 1, got {args.max_waiting}")
    if args.max_request_bytes < 1024:
        raise FlashportError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    if args.shutdown_grace < 0:
        raise FlashportError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FLASHPORT_API_KEY") or None
    model = args.model
    if model is None:  # the embedded tiny model, written on first use
        model = str(DEFAULT_SERVE_MODEL)
        if not (DEFAULT_SERVE_MODEL / "config.json").is_file():
            from flashport.model.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(DEFAULT_SERVE_MODEL, seed=0)
            print(f"wrote the tiny demo model to {DEFAULT_SERVE_MODEL}", flush=True)

    from flashport.server.app import run_server

    engine_args = dict(
        device=args.device, dtype=args.dtype, load_format=args.load_format, num_layers=args.num_layers,
        dequantize=args.dequantize, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, cache_bytes=args.cache_bytes,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed, progress=False, ops_impl=args.ops_impl,
        kv_cache_dtype=args.kv_cache_dtype, enforce_eager=args.enforce_eager,
        overlap=False if args.no_overlap else None)
    engine_args["expert_parallel_size"] = args.expert_parallel_size
    if args.expert_parallel_size > 1:
        from flashport.distributed.launch import is_torchrun_worker, run_torchrun_worker

        if is_torchrun_worker():  # torchrun rank > 0: no server, it follows rank 0
            run_torchrun_worker(model, engine_args)
    return run_server(model, host=args.host, port=args.port, api_key=api_key,
                      served_model_name=args.served_model_name, max_waiting=args.max_waiting,
                      max_request_bytes=args.max_request_bytes, shutdown_grace=args.shutdown_grace,
                      log_level=args.log_level, access_log=args.access_log, engine_args=engine_args)


KV_CACHE_DTYPE_HELP = ("compressed entries and indexer keys: auto = the model dtype (default), fp8 = E4M3 "
                       "(e4m3fnuz on MI300X), half the bytes; window rows stay in the model dtype")


ENFORCE_EAGER_HELP = "run decode steps eagerly (no CUDA/HIP graph capture and replay)"
NO_OVERLAP_HELP = ("process each step's tokens before launching the next step (default on a GPU: the next "
                   "step is launched first, so detokenization and stop checks run while the device works)")


EXPERT_PARALLEL_HELP = ("split the routed experts over N GPUs of this host, one process each (rank 0 serves; "
                        "several hosts: start every rank with torchrun, see docs/expert_parallel.md); default 1")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and engine options `generate` and `serve` share."""
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto",
                   help="dummy = random weights of the right shapes, no checkpoint read (only safetensors "
                        "files are ever loaded)")
    p.add_argument("--num-layers", type=int, default=None, help="run only the first N layers")
    p.add_argument("--dequantize", action="store_true", help="dequantize FP8/FP4 weights at load time")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default 8192)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and state pools (default 0.9)")
    p.add_argument("--cache-bytes", type=int, default=None,
                   help="state pool budget in bytes (the CPU budget; on a GPU it overrides the fraction)")
    p.add_argument("--ops-impl", choices=["auto", "reference", "torch", "triton"], default="auto",
                   help="how the model computes: auto (Triton kernels on a GPU, torch twins on a CPU; default), "
                        "reference (plain torch), torch, triton")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--enforce-eager", action="store_true", help=ENFORCE_EAGER_HELP)
    p.add_argument("--no-overlap", action="store_true", help=NO_OVERLAP_HELP)
    p.add_argument("--expert-parallel-size", type=int, default=1, metavar="N", help=EXPERT_PARALLEL_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashport", description="DeepSeek-V4-Flash inference engine (PyTorch + Triton)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    env = sub.add_parser("env", help="show the platform flashport would run on")
    env.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    env.set_defaults(func=_cmd_env)

    tiny = sub.add_parser("init-tiny", help="write a tiny random checkpoint for demos and tests")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tiny.set_defaults(func=_cmd_init_tiny)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("model", help="model directory (config.json, tokenizer, safetensors)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--thinking", action="store_true", help="chat in thinking mode (needs --chat)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1, help="-1 = off (default)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    _add_model_args(gen)
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("model", nargs="?", default=None,
                     help=f"model directory (default: the tiny demo model, written to {DEFAULT_SERVE_MODEL} "
                          "if missing)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/* (default: $FLASHPORT_API_KEY, else none)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients use (default: the model directory's name)")
    srv.add_argument("--max-waiting", type=int, default=1024,
                     help="requests that may wait for their first token; beyond it 503 + Retry-After (default 1024)")
    srv.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                     help="largest request body, else 413 (default 16 MiB)")
    srv.add_argument("--shutdown-grace", type=float, default=30.0,
                     help="seconds requests in flight get to finish after SIGTERM before they are aborted (default 30)")
    srv.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    srv.add_argument("--access-log", action="store_true", help="log every HTTP request")
    _add_model_args(srv)
    srv.add_argument("--max-num-seqs", type=int, default=256, help="sequences in the running batch (default 256)")
    srv.add_argument("--max-num-batched-tokens", type=int, default=2048,
                     help="tokens per engine step, the prefill chunk budget (default 2048)")
    srv.add_argument("--block-size", type=int, default=None, help="cache block size in tokens (default: the model's)")
    srv.add_argument("--no-prefix-caching", action="store_true", help="disable prefix reuse")
    srv.add_argument("--seed", type=int, default=0, help="engine seed (for requests without a seed)")
    srv.set_defaults(func=_cmd_serve)

    from flashport.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlashportError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `flashport ... | head`: stop quietly; point stdout at devnull so the exit flush can't fail.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
