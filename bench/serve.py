"""What HTTP costs: tokens/s served to 8 concurrent clients by ``generator.py --serve``, against the same engine
called directly (what the CLI does), on the same checkpoint, prompts, seeds and settings, in one run.

    python bench/serve.py            # full KoGPT2 size, random weights, the real v2 tokenizer; ~1 minute on 2 cores
    python bench/serve.py --smoke    # a tiny model, seconds (the tests run this)
Writes bench/serve_results.json; exits 1 if the server keeps less than 90% of the engine's tokens/s.
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
GOAL = 0.9


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


def requests(tokens: int) -> list[dict]:
    return [{"prompt": f"오늘 아침에는 {i}", "max_tokens": tokens, "seed": i, "temperature": 1.0} for i in range(CLIENTS)]


def engine(path: Path, bodies: list[dict]) -> dict:
    """The CLI's path: the same engine in this process, one request after another."""
    from kogpt2.defaults import SAMPLING
    from kogpt2.generation.engine import TextSampler
    from kogpt2.store.opening import open_model

    opened = open_model(str(path))
    sampler = TextSampler(opened.model.eval(), opened.tokenizer)
    sampler.complete(sampler.prompt_ids("준비"), SAMPLING.with_value("text_size", 4), 0)  # warm up
    started, tokens = time.perf_counter(), 0
    for body in bodies:
        settings = SAMPLING.with_value("text_size", body["max_tokens"]).with_value("temperature", body["temperature"])
        tokens += sum(piece.tokens for piece in sampler.stream(sampler.prompt_ids(body["prompt"]), settings,
                                                               body["seed"]) if piece.done)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def served(path: Path, bodies: list[dict]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "generator.py", "--load_path", str(path), "--serve", "--port",
                                str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        process.stdout.readline()

        def post(body: dict) -> dict:
            for _ in range(600):
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                    return json.loads(connection.getresponse().read())
                except ConnectionRefusedError:
                    time.sleep(0.1)
            raise RuntimeError("the server did not start")

        post({"prompt": "준비", "max_tokens": 4, "seed": 0})  # warm up
        answers: list[dict] = [{}] * len(bodies)

        def client(i: int) -> None:
            answers[i] = post(bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(30)
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "requests_per_s": len(bodies) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script, measures nothing")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = make_checkpoint(Path(folder), args.smoke)
        bodies = requests(args.tokens)
        direct = engine(path, bodies)
        http_side = served(path, bodies)
    ratio = http_side["tokens_per_s"] / direct["tokens_per_s"]
    verdict = "PASS" if ratio >= GOAL else "FAIL"
    print(f"engine (CLI path), {CLIENTS} requests in turn: {direct['tokens_per_s']:.1f} tokens/s")
    print(f"server, {CLIENTS} concurrent clients: {http_side['tokens_per_s']:.1f} tokens/s, "
          f"{http_side['requests_per_s']:.2f} requests/s")
    print(f"served / engine: {ratio:.3f}  goal >= {GOAL}  {verdict}")
    if not args.smoke:
        result = {"date": time.strftime("%Y-%m-%d"), "engine": direct, "server": http_side, "ratio": ratio,
                  "verdict": verdict}
        (REPO / "bench" / "serve_results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if verdict == "PASS" or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
