"""Load on an OpenAI-compatible server: C clients at once, each sending
streamed chat completions one after another; prints one JSON line with the
aggregate completion tokens per second, the time to first token (first
content piece) and how the tokens were counted.

    python tests/benches/openai_load.py BASE_URL CLIENTS REQUESTS_PER_CLIENT MAX_TOKENS

`cargo run -p xtask -- bench-serve-model` runs it against `ganglion
serve-model` and llama-cpp-python's server on the same GGUF, alternating.
Standard library only, so the client costs the same against both.
"""

import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

SYSTEM = (
    "You are the assistant of a building's gateway. Answer in full sentences, "
    "explain your reasoning, and mention every sensor the question names."
)
TOPICS = [
    "the boiler room reads 71 C and the pump is humming",
    "the cold store reads -12 C and its door sensor is open",
    "the server room reads 29 C with two fans stopped",
    "the greenhouse reads 35 C with 90 % humidity",
    "the garage CO reads 40 ppm and rising",
    "the kitchen smoke sensor chirps every minute",
    "the basement water sensor reports wet",
    "the lift motor reads 88 C after an hour of use",
]


def one(base, n, max_tokens, out):
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    body = json.dumps(
        {
            "model": "default",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Request {n}: {TOPICS[n % len(TOPICS)]}. What should happen next, and why?"},
            ],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    start = time.perf_counter()
    conn.request("POST", url.path + "/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{base}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    pieces = 0
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices", []):
            if c.get("delta", {}).get("content"):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - start
    conn.close()
    out.append({"ttft": first or 0.0, "tokens": usage if usage is not None else pieces, "usage": usage is not None})


def main():
    base, clients, per_client, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    results = []

    def client(c):
        for r in range(per_client):
            one(base, c * per_client + r, max_tokens, results)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    print(
        json.dumps(
            {
                "clients": clients,
                "requests": len(results),
                "tokens": tokens,
                "tok_s": tokens / wall,
                "ttft_mean_ms": 1000 * statistics.mean(ttft),
                "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
                "ttft_max_ms": 1000 * ttft[-1],
                "counted_by": "usage" if all(r["usage"] for r in results) else "pieces",
            }
        )
    )


if __name__ == "__main__":
    main()
