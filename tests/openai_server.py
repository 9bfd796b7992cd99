"""A local OpenAI-compatible chat-completions server on 127.0.0.1 that answers like the oracle.

Used by the openai backend tests: ``OracleServer(dataset_root)`` starts in a thread on a free
port; images arrive as base64 data URLs and are matched to SynthPEDES files by their bytes; the
task is recognised from the prompt. ``fail_first`` makes the first N completions answer 503 to
exercise retries. Faults for the failover tests: ``fail_every`` (every completion answers HTTP 500
while set), ``hang`` (seconds a completion sleeps before answering: past the client's timeout),
``die_after`` (after N answered completions the server dies: the listener closes and requests in
flight get no reply), ``cut_after`` (after N answered completions the next reply stops after its
status line, headers and a few body bytes, and the server dies: what a real vLLM server SIGKILLed
mid-reply does; ``cut`` counts such replies) and :meth:`kill`. ``answered`` lists the (prompt, image) of every completion
it really sent back. Run by hand: ``python tests/openai_server.py DATASET_ROOT [PORT]``.

Logprobs (``logprobs: true, top_logprobs: N`` in a request): ``logprobs=True`` (default) answers
with an OpenAI ``choices[0].logprobs`` object whose first token's ``top_logprobs`` put the oracle's
p_yes on "Yes"/" Yes" and 1 - p_yes on "No"/"no" (so P(Yes) renormalised over them is the
oracle's p_yes; "The" takes some mass too), ``logprobs=False`` never sends logprobs (a server
without them), ``logprobs="unmatched"`` sends byte-level token names ("ĠYes") no text matches.
``logprob_requests`` counts the completions that asked for logprobs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mllm_tune.core.backends import MLLMRequest
from synthpedes.oracle import OracleBackend
from mllm_tune.core.prompts import DEFAULT_PROMPTS


class OracleServer:
    def __init__(self, dataset_root: str | Path, model: str = "oracle", port: int = 0, fail_first: int = 0,
                 loc_rule: str = "identity", fail_every: bool = False, hang: float = 0.0,
                 die_after: int | None = None, logprobs: bool | str = True, cut_after: int | None = None) -> None:
        self.oracle = OracleBackend(dataset_root, loc_rule=loc_rule)
        self.model = model
        self.by_hash = {hashlib.sha256(p.read_bytes()).hexdigest(): str(p)
                        for p in (Path(dataset_root) / "imgs").rglob("*.png")}
        self.fail_left = fail_first
        self.completions = 0
        self.fail_every, self.hang, self.die_after = fail_every, float(hang), die_after
        self.logprobs = logprobs
        self.logprob_requests = 0
        self.cut_after, self.cut = cut_after, 0
        self.dead = False
        self.answered: list[tuple[str, str | None]] = []
        self.failed = 0  # completions answered with an error (503/500) or left hanging
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.dead:  # a dead server's requests in flight get no reply
                    self.close_connection = True
                    return
                with server.lock:
                    if server.fail_left > 0 or server.fail_every:
                        server.fail_left = max(0, server.fail_left - 1)
                        server.failed += 1
                        return self._send(503 if not server.fail_every else 500, {"error": "busy, retry"})
                if server.hang:
                    with server.lock:
                        server.failed += 1
                    time.sleep(server.hang)
                    self.close_connection = True
                    return
                if body.get("model") != server.model:
                    return self._send(404, {"error": f"model {body.get('model')} not served"})
                content = body["messages"][-1]["content"]
                answer, p_yes = server.answer_scored(content)
                with server.lock:
                    if server.dead:
                        self.close_connection = True
                        return
                    cut = server.cut_after is not None and server.completions >= server.cut_after
                    if cut:
                        server.cut += 1
                        server.kill()
                    else:
                        server.completions += 1
                        server.logprob_requests += bool(body.get("logprobs"))
                        server.answered.append(server.key(content))
                        if server.die_after is not None and server.completions >= server.die_after:
                            server.kill()
                if cut:  # the status line and headers go out, the body stops short: IncompleteRead
                    data = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:5])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                          "logprobs": None}
                if body.get("logprobs") and server.logprobs:
                    choice["logprobs"] = server.logprob_object(answer, p_yes, int(body.get("top_logprobs") or 0))
                self._send(200, {"object": "chat.completion", "model": server.model, "choices": [choice]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, content: list[dict]) -> str:
        return self.answer_scored(content)[0]

    def answer_scored(self, content: list[dict]) -> tuple[str, float | None]:
        """The oracle's answer and, for T_loc, its p_yes (0.9 / 0.1 if the oracle has no scores)."""
        image, prompt = None, ""
        for part in content:
            if part["type"] == "image_url":
                raw = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                image = self.by_hash[hashlib.sha256(raw).hexdigest()]
            elif part["type"] == "text":
                prompt = part["text"]
        if image is None:
            task = "aggr"
        else:
            task = "vqa" if prompt == DEFAULT_PROMPTS.render_vqa() else "loc"
        req = MLLMRequest(task, prompt, image)
        if task != "loc":
            return self.oracle.generate([req])[0], None
        if getattr(self.oracle, "scores_loc", False):
            a = self.oracle.localize([req])[0]
            return a.text, a.p_yes
        text = self.oracle.generate([req])[0]
        return text, 0.9 if text == "Yes" else 0.1

    def logprob_object(self, answer: str, p_yes: float | None, top: int) -> dict:
        """An OpenAI chat ``logprobs`` object for the answer's first token."""
        first = answer.split(" ", 1)[0] or answer
        if p_yes is None:  # not a T_loc answer: the first word is sure
            tops = [(first, 0.0)]
        else:
            p = min(max(p_yes, 1e-12), 1 - 1e-12)  # log(0) is no logprob
            named = {"Yes": 0.8 * p, " Yes": 0.1 * p, "No": 0.8 * (1 - p), "no": 0.1 * (1 - p), "The": 0.1}
            tops = sorted(((t, math.log(v)) for t, v in named.items()), key=lambda kv: -kv[1])
        if self.logprobs == "unmatched":  # raw byte-level BPE names: no exact text match
            tops = [("\u0120" + t.lstrip(" "), lp) for t, lp in tops]
            first = "\u0120" + first
        chosen = dict(tops).get(first, tops[0][1])
        return {"content": [{"token": first, "logprob": chosen, "bytes": list(first.encode()),
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                              for t, lp in tops[:max(top, 0)]]}]}

    def key(self, content: list[dict]) -> tuple[str, str | None]:
        image, prompt = None, ""
        for part in content:
            if part["type"] == "image_url":
                image = hashlib.sha256(part["image_url"]["url"].encode()).hexdigest()[:16]
            elif part["type"] == "text":
                prompt = part["text"]
        return prompt, image

    def kill(self) -> None:
        """Die now: refuse new connections (the listener closes) and answer nothing in flight."""
        self.dead = True
        threading.Thread(target=self._stop, daemon=True).start()  # shutdown() must not run in a handler

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "OracleServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.dead = True
        self._stop()


if __name__ == "__main__":
    with OracleServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 8000) as s:
        print(f"serving the oracle at {s.base_url}")
        s.thread.join()
