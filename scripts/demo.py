"""`make demo`: start `flashport serve`, send one chat request with the official openai client,
print the reply, stop the server (SIGTERM) and check it exits cleanly.

    python scripts/demo.py [--model DIR] [--prompt TEXT] [--max-tokens N]

Without --model the server serves the tiny demo model (models/tiny, written on first use). The
server binds 127.0.0.1 on a free port and requires a random API key, so nothing else can use it.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the tiny demo model)")
    ap.add_argument("--prompt", default="Tell me about the sea.")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    import openai

    key = "sk-demo-" + secrets.token_hex(8)
    cmd = [sys.executable, "-m", "flashport", "serve", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", "0", "--api-key", key, "--log-level", "warning"]
    print("$ flashport serve", " ".join(cmd[4:]).replace(key, "<key>"), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    port: list[int] = []
    ready = threading.Event()

    def pump() -> None:  # echo the server's output, catch its address
        assert proc.stdout is not None
        for line in proc.stdout:
            print("  [server] " + line.rstrip(), flush=True)
            m = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", line)
            if m and not port:
                port.append(int(m.group(1)))
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not ready.wait(300) or not port:
            print("error: the server did not start", file=sys.stderr)
            return 1
        base = f"http://127.0.0.1:{port[0]}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                print("error: the server is not healthy", file=sys.stderr)
                return 1
            time.sleep(0.1)

        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        print(f"\nuser: {args.prompt}", flush=True)
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                               max_tokens=args.max_tokens, temperature=0)
        elapsed = time.perf_counter() - t0
        print(f"assistant: {reply.choices[0].message.content}")
        u = reply.usage
        print(f"[{model}: prompt {u.prompt_tokens} tokens, completion {u.completion_tokens} tokens, "
              f"{elapsed:.2f} s, {u.completion_tokens / elapsed:.1f} tokens/s, "
              f"finish_reason {reply.choices[0].finish_reason}]\n", flush=True)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(5)
    if rc != 0:
        print(f"error: the server exited with code {rc}", file=sys.stderr)
        return 1
    print("server stopped cleanly (exit 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
