"""A tiny model hub on 127.0.0.1 that speaks the endpoints huggingface_hub uses.

Uploads: enough for `HfApi.create_repo` + `upload_folder` (and so `mllm_tune.push`): repo
creation, YAML validation, pre-upload (every file "regular", i.e. inline base64 in the commit)
and the NDJSON commit. Files that arrive are kept in memory per repo, so tests can check them
byte for byte.

Downloads: enough for `snapshot_download` / `hf_hub_download`: repo info
(`GET /api/models/{repo}/revision/{rev}` -> sha + siblings), the file tree
(`GET /api/models/{repo}/tree/{rev}`) and file resolution (`HEAD`/`GET /{repo}/resolve/{rev}/{file}`
with ETag, X-Repo-Commit and Content-Length). `add_repo` publishes a folder; each repo has one
commit per change (`commit_of`). Unknown repos answer 404 with `X-Error-Code: RepoNotFound`, unknown
revisions `RevisionNotFound`, as the hub does. No mocking of huggingface_hub: it talks HTTP to this
server for real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubServer:
    """`with HubServer() as hub: HfApi(endpoint=hub.url)...; hub.files("owner/name")`."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str) -> dict[str, bytes]:
        return dict(self.repos.get(repo_id, {}))

    def add_repo(self, repo_id: str, folder: str | Path | None = None, files: dict[str, bytes] | None = None) -> str:
        """Publish a folder's files (or ``files``) as a new commit of ``repo_id``; returns the commit."""
        got = dict(files or {})
        if folder is not None:
            root = Path(folder)
            got.update({p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
        with self._lock:
            self.repos[repo_id] = got
        return self.commit_of(repo_id)

    def commit_of(self, repo_id: str) -> str:
        """A 40-hex commit id that changes whenever the repo's content does."""
        h = hashlib.sha1(repo_id.encode())
        for path, data in sorted(self.repos.get(repo_id, {}).items()):
            h.update(path.encode() + b"\0" + hashlib.sha1(data).digest())
        return h.hexdigest()

    def _lookup(self, repo_id: str, rev: str) -> tuple[str | None, str | None]:
        """(commit, error code) of ``repo_id`` at ``rev`` (a branch name 'main' or the commit)."""
        if repo_id not in self.repos:
            return None, "RepoNotFound"
        commit = self.commit_of(repo_id)
        if urllib.parse.unquote(rev) not in ("main", commit):
            return None, "RevisionNotFound"
        return commit, None

    def start(self) -> "HubServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, code: int, payload: object) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _error(self, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _download(self, head: bool) -> None:
                path = urllib.parse.urlsplit(self.path).path
                m = re.fullmatch(r"/api/models/(.+?)/revision/(.+)", path)
                if m and not head:
                    commit, err = server._lookup(m.group(1), m.group(2))
                    if err:
                        return self._error(err, f"{m.group(1)}@{m.group(2)}: {err}")
                    files = sorted(server.repos[m.group(1)])
                    return self._send(200, {"id": m.group(1), "modelId": m.group(1), "sha": commit, "private": False,
                                            "siblings": [{"rfilename": f} for f in files]})
                m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
                if m and not head:
                    commit, err = server._lookup(m.group(1), m.group(2))
                    if err:
                        return self._error(err, f"{m.group(1)}@{m.group(2)}: {err}")
                    return self._send(200, [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                            for f, d in sorted(server.repos[m.group(1)].items())])
                m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
                if m:
                    repo_id, rev, name = m.group(1), m.group(2), urllib.parse.unquote(m.group(3))
                    commit, err = server._lookup(repo_id, rev)
                    if err:
                        return self._error(err, f"{repo_id}@{rev}: {err}")
                    data = server.repos[repo_id].get(name)
                    if data is None:
                        return self._error("EntryNotFound", f"{name} is not in {repo_id}")
                    self.send_response(200)
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Content-Type", "application/octet-stream")
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    return None
                self._send(404, {"error": f"not implemented: {self.command} {self.path}"})

            def do_HEAD(self) -> None:  # noqa: N802
                server.requests.append(("HEAD", self.path))
                self._download(head=True)

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(("GET", self.path))
                self._download(head=False)

            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                server.requests.append(("POST", path))
                body = self._body()
                if path == "/api/repos/create":
                    req = json.loads(body or b"{}")
                    name = req.get("name")
                    repo_id = f"{req['organization']}/{name}" if req.get("organization") else name
                    if "/" not in repo_id:
                        repo_id = f"local-user/{repo_id}"
                    with server._lock:
                        server.repos.setdefault(repo_id, {})
                    return self._send(200, {"url": f"{server.url}/{repo_id}", "name": repo_id, "id": repo_id})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path)
                if m:
                    req = json.loads(body or b"{}")
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in req.get("files", [])]
                    return self._send(200, {"files": files, "commitOid": "0" * 40})
                m = re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)
                if m:
                    repo_id = m.group(1)
                    got: dict[str, bytes] = {}
                    header: dict = {}
                    for line in body.splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item.get("key") == "header":
                            header = item.get("value", {})
                        elif item.get("key") == "file":
                            v = item["value"]
                            data = v["content"]
                            got[v["path"]] = base64.b64decode(data) if v.get("encoding") == "base64" else data.encode()
                        elif item.get("key") == "deletedFile":
                            got[item["value"]["path"]] = b""
                    oid = hashlib.sha1(body).hexdigest()
                    with server._lock:
                        repo = server.repos.setdefault(repo_id, {})
                        for p, data in got.items():
                            if data == b"" and p in repo:
                                del repo[p]
                            else:
                                repo[p] = data
                        server.commits.append({"repo": repo_id, "revision": m.group(2), "summary":
                                               header.get("summary"), "paths": sorted(got)})
                    return self._send(200, {"commitUrl": f"{server.url}/{repo_id}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                self._send(404, {"error": f"not implemented: POST {path}"})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
