"""The `flashport` command: `env`, `init-tiny`, `generate`.

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
    gen.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    gen.add_argument(
        "--load-format",
        choices=["auto", "safetensors", "dummy"],
        default="auto",
        help="dummy = random weights of the right shapes (no checkpoint read)",
    )
    gen.add_argument("--num-layers", type=int, default=None, help="run only the first N layers")
    gen.add_argument(
        "--dequantize", action="store_true", help="dequantize FP8/FP4 weights at load time"
    )
    gen.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default 8192)")
    gen.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="fraction of GPU memory for weights, activations and state pools (default 0.9)")
    gen.add_argument("--cache-bytes", type=int, default=None,
                     help="state pool budget in bytes (the CPU budget; on a GPU it overrides the fraction)")
    gen.set_defaults(func=_cmd_generate)
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
