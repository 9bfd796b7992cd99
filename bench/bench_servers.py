"""Requests/s of the openai backend with 1 vs 2 local OpenAI-compatible servers (issue 18, item 5).

The same requests (T_loc-shaped: a 64x128 PNG as a base64 data URL plus a caption prompt, distinct
prompts, no answer cache) go through ``OpenAIBackend`` once against one fake server and once
against two, with the same per-server concurrency. Each fake server (a ``ThreadingHTTPServer`` on
127.0.0.1, started here) sleeps ``latency`` seconds per completion, standing in for the model's
time, and answers "Yes". Two settings: latency 0 (pure client + HTTP overhead) and a latency that
makes a server the bottleneck (what a second server should halve).

On a 2-core machine both servers, the client and its threads share the same two cores: the
latency-0 ratio mainly shows the overhead of the pool (picking a server, the lock), not a speed-up;
the latency setting shows that requests spread over the servers as they should. One run each, side
by side; read the ratios.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench import md_table


class _FakeServer:
    def __init__(self, latency: float, model: str = "m") -> None:
        self.completions = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"data": [{"id": model}]})

            def do_POST(self):
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if latency:
                    time.sleep(latency)
                with lock:
                    server.completions += 1
                self._send({"choices": [{"message": {"content": "Yes"}, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _requests(tmp: Path, n: int):
    from PIL import Image

    from mllm_tune.core.backends import MLLMRequest
    from mllm_tune.core.prompts import DEFAULT_PROMPTS as P

    img = tmp / "crop.png"
    Image.new("RGB", (64, 128), (120, 80, 40)).save(img)
    return [MLLMRequest("loc", P.render_loc(f"A person in a red coat, number {i}."), str(img)) for i in range(n)]


def _rate(reqs, servers: list[_FakeServer], concurrency: int) -> dict:
    from mllm_tune.core.backends import make_backend

    be = make_backend("openai", base_url=[s.url for s in servers] if len(servers) > 1 else servers[0].url,
                      model="m", concurrency=concurrency, backoff=0.01)
    be.generate(reqs[:2])  # server check + pool start outside the timing
    before = [s.completions for s in servers]
    t0 = time.perf_counter()
    answers = be.generate(reqs)
    dt = time.perf_counter() - t0
    be.close()
    assert answers == ["Yes"] * len(reqs)
    return {"seconds": dt, "rps": len(reqs) / dt, "per_server": [s.completions - b for s, b in zip(servers, before)]}


def run(smoke: bool = False) -> dict:
    n = 24 if smoke else 400
    concurrency = 4
    settings = [0.0, 0.01] if smoke else [0.0, 0.05]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        reqs = _requests(Path(tmp), n)
        for latency in settings:
            servers = [_FakeServer(latency), _FakeServer(latency)]
            try:
                one = _rate(reqs, servers[:1], concurrency)
                two = _rate(reqs, servers, concurrency)
            finally:
                for s in servers:
                    s.close()
            ratio = two["rps"] / one["rps"]
            rows.append([f"{latency * 1000:.0f} ms", one["rps"], two["rps"], ratio,
                         "/".join(map(str, two["per_server"]))])
            figures[f"latency_{int(latency * 1000)}ms"] = {"rps_1": round(one["rps"], 2), "rps_2": round(two["rps"], 2),
                                                           "ratio_2_over_1": round(ratio, 3),
                                                           "requests_per_server_2": two["per_server"]}
    table = md_table(["server latency", "1 server req/s", "2 servers req/s", "ratio 2/1", "requests per server (2)"],
                     rows)
    md = (f"{n} T_loc-shaped requests (64x128 PNG + caption), the openai backend with concurrency {concurrency} per "
          "server, local fake servers on 127.0.0.1 that sleep the stated latency per completion; one run each, side "
          "by side.\n\n" + table + "\n\nOn a 2-core machine the servers, the client and its threads share two cores: "
          "at latency 0 the ratio shows the pool's overhead rather than a speed-up; with a latency the second server "
          "doubles the requests in flight, so the ratio approaches 2 only while the cores are not the bottleneck.")
    return {"title": "Several servers: openai backend requests/s, 1 vs 2 local servers (issue 18)",
            "markdown": md, "figures": figures}


if __name__ == "__main__":
    res = run()
    print(res["markdown"])
