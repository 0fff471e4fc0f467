"""What continuous batching gives real clients of `generator.py --serve`, in one run against one server:

1. one streaming client alone, then 8 concurrent streaming clients with different prompts and settings: total
   tokens/s of the 8 over the one's (goal >= 3x), p95 time to first token (goal <= 1 s), errors (goal 0);
2. 64 concurrent clients against a waiting line of 16: each request completes or gets a 503 at once (goal: every
   503 within 1 s), the server's memory stays flat (goal: RSS grows < 10%), /health answers throughout (goal: every
   poll within 1 s);
3. a streaming client that disconnects: its rows leave within one decoding step (goal <= 1 step after the server
   sees the close).

    python bench/serve.py            # full KoGPT2 size, random weights, the real v2 tokenizer; a few minutes on 2 cores
    python bench/serve.py --smoke    # a tiny model, seconds (the tests run this): checks the script, judges nothing
Writes bench/serve_results.json; exits 1 if a goal is missed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
V2_TOKENIZER = REPO.parent / "shared" / "fixtures" / "kogpt2-v2" / "tokenizer.json"
CLIENTS = 8
CROWD, QUEUE = 64, 16
GOALS = {"speedup": 3.0, "p95_first_token_s": 1.0, "busy_answer_s": 1.0, "rss_growth": 0.10, "health_s": 1.0,
         "steps_after_close": 1}


def make_checkpoint(folder: Path, smoke: bool) -> Path:
    """A generation file like `kogpt2.export --half` writes, but fp32: random weights, a real or a scratch tokenizer."""
    import torch

    from kogpt2.corpus.tokenizer import load_tokenizer
    from kogpt2.model.gpt import GPT, GPTConfig
    from kogpt2.model.hf_layout import hf_state_dict
    from kogpt2.store.checkpoint import FORMAT_VERSION, save_checkpoint, tokenizer_record
    from kogpt2.store.scratch import train_tokenizer

    if smoke:
        texts = (REPO / "data" / "sample.csv").read_text(encoding="utf-8").splitlines()[1:]
        tokenizer = train_tokenizer(texts, vocab_size=1000)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=2)
    else:
        tokenizer = load_tokenizer(V2_TOKENIZER)
        config = GPTConfig()
    torch.manual_seed(0)
    model = GPT(config)
    path = folder / "bench.tar"
    save_checkpoint(path, {"format_version": FORMAT_VERSION, "config": config.to_dict(),
                           "tokenizer": tokenizer_record(tokenizer), "model_state_dict": hf_state_dict(model)})
    return path


SETTINGS = [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 20}, {"temperature": 0.9, "top_p": 0.8},
            {"temperature": 1.0, "presence_penalty": 0.5}, {"temperature": 0.0}, {"temperature": 1.2, "top_k": 0},
            {"temperature": 0.8, "frequency_penalty": 0.5}, {"temperature": 1.0, "repetition_penalty": 1.2}]


def bodies(tokens: int, count: int) -> list[dict]:
    """Requests that each draw exactly ``tokens`` (the end token banned), with different prompts and settings."""
    return [{"prompt": f"오늘 아침에는 {i}", "max_tokens": tokens, "seed": i, "logit_bias": {"1": -100},
             **SETTINGS[i % len(SETTINGS)]} for i in range(count)]


class Served:
    def __init__(self, path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "generator.py", "--load_path", str(path), "--serve",
                                         "--port", str(self.port), "--max_queue", str(QUEUE)], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.process.stdout.readline()
        while True:
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.1)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def health(self) -> dict:
        connection = self.connection()
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stream(self, body: dict) -> dict:
        """One streamed request: its tokens, time to first text and whole time; or its error status."""
        started = time.perf_counter()
        connection = self.connection()
        connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return {"status": response.status, "seconds": time.perf_counter() - started}
        first, tokens = None, 0
        for line in response:
            line = line.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event["choices"]):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return {"status": 200, "tokens": tokens, "first_token_s": first, "seconds": time.perf_counter() - started}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def together(work, items: list) -> tuple[list, float]:
    results = [None] * len(items)

    def run(i: int) -> None:
        results[i] = work(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def concurrency(server: Served, tokens: int) -> dict:
    server.stream({"prompt": "준비", "max_tokens": 4, "seed": 0})  # warm up
    alone = server.stream(bodies(tokens, 1)[0])
    many, seconds = together(server.stream, bodies(tokens, CLIENTS))
    firsts = sorted(r["first_token_s"] for r in many if r["status"] == 200)
    total = sum(r.get("tokens", 0) for r in many)
    return {"alone_tokens_per_s": alone["tokens"] / alone["seconds"], "clients": CLIENTS,
            "together_tokens_per_s": total / seconds, "speedup": total / seconds / (alone["tokens"] / alone["seconds"]),
            "p95_first_token_s": firsts[int(0.95 * (len(firsts) - 1) + 0.5)] if firsts else None,
            "errors": sum(r["status"] != 200 for r in many)}


def crowd(server: Served, tokens: int) -> dict:
    rss_before = server.rss_mb()
    polls, stop = [], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                server.health()
                polls.append(time.perf_counter() - started)
            except OSError:
                polls.append(float("inf"))
            time.sleep(0.2)

    poller = threading.Thread(target=poll)
    poller.start()
    results, seconds = together(server.stream, bodies(tokens, CROWD))
    stop.set()
    poller.join()
    busy = [r["seconds"] for r in results if r["status"] == 503]
    return {"clients": CROWD, "queue": QUEUE, "completed": sum(r["status"] == 200 for r in results),
            "busy": len(busy), "other": sum(r["status"] not in (200, 503) for r in results),
            "busy_answer_s": max(busy, default=0.0), "seconds": seconds, "rss_before_mb": rss_before,
            "rss_after_mb": server.rss_mb(), "rss_growth": server.rss_mb() / rss_before - 1,
            "health_polls": len(polls), "health_s": max(polls, default=0.0)}


def disconnect(server: Served) -> dict:
    connection = server.connection()
    connection.request("POST", "/v1/completions", json.dumps({**bodies(200, 1)[0], "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    for _ in range(4):
        response.readline()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    closed_at = server.health()["steps"]
    while server.health()["rows"]:
        time.sleep(0.005)
    return {"steps_after_close": server.health()["steps"] - closed_at}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, judges nothing")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = Served(make_checkpoint(Path(folder), args.smoke))
        try:
            result = {"concurrency": concurrency(server, args.tokens), "crowd": crowd(server, args.tokens // 2),
                      "disconnect": disconnect(server)}
        finally:
            server.stop()
    c, k, d = result["concurrency"], result["crowd"], result["disconnect"]
    checks = {"speedup": c["speedup"] >= GOALS["speedup"],
              "p95_first_token_s": c["p95_first_token_s"] is not None and c["p95_first_token_s"] <= GOALS[
                  "p95_first_token_s"],
              "errors": c["errors"] == 0,
              "every request completes or is refused": k["completed"] + k["busy"] == CROWD and k["other"] == 0,
              "busy_answer_s": k["busy_answer_s"] <= GOALS["busy_answer_s"],
              "rss_growth": k["rss_growth"] < GOALS["rss_growth"], "health_s": k["health_s"] <= GOALS["health_s"],
              "steps_after_close": d["steps_after_close"] <= GOALS["steps_after_close"]}
    print(f"1 client alone: {c['alone_tokens_per_s']:.1f} tokens/s; {CLIENTS} together: "
          f"{c['together_tokens_per_s']:.1f} tokens/s = {c['speedup']:.2f}x (goal >= {GOALS['speedup']}); p95 first "
          f"token {c['p95_first_token_s']:.2f} s (goal <= {GOALS['p95_first_token_s']}); errors {c['errors']}")
    print(f"{CROWD} clients, line of {QUEUE}: {k['completed']} completed, {k['busy']} got 503 (slowest "
          f"{k['busy_answer_s']:.2f} s), {k['other']} other; RSS {k['rss_before_mb']:.0f} -> {k['rss_after_mb']:.0f} "
          f"MB; /health {k['health_polls']} polls, slowest {k['health_s']:.2f} s")
    print(f"a client that closes its stream: its rows left {d['steps_after_close']} step(s) after the server saw it")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    verdict = "PASS" if all(checks.values()) else "FAIL"
    print(f"served: {verdict}")
    if not args.smoke:
        result.update(date=time.strftime("%Y-%m-%d"), verdict=verdict)
        (REPO / "bench" / "serve_results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if verdict == "PASS" or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
