"""A Hugging Face Hub stand-in on 127.0.0.1 for offline tests: the few endpoints huggingface_hub's own
``create_repo``, ``create_commit`` (small files, inline "regular" uploads), ``model_info`` and
``hf_hub_download``/``snapshot_download`` use, with the repositories kept in a local directory.

    with FakeHub(tmp_path / "hub") as hub:       # sets HF_ENDPOINT for huggingface_hub
        push_to_hub(run_dir, "me/adapter")
        hub.files("me/adapter")                   # {"README.md": b"...", ...}

Every request is recorded in ``hub.requests`` (method, path); an endpoint it does not know answers 404
and is recorded too, so a test shows what huggingface_hub asked for.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

_API_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        self.commits: dict[str, int] = {}
        self.validated: list[bool] = []  # one entry per README metadata check (True: a valid YAML mapping)

    # ----------------------------------------------------------------- storage
    def repo_dir(self, repo: str) -> Path:
        return self.root / repo

    def files(self, repo: str) -> dict[str, bytes]:
        d = self.repo_dir(repo)
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    def sha(self, repo: str) -> str:
        h = hashlib.sha1(f"{repo}:{self.commits.get(repo, 0)}".encode())
        return h.hexdigest()

    # ----------------------------------------------------------------- server
    def __enter__(self) -> "FakeHub":
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """The Hub endpoints, backed by ``self.server.hub`` (a :class:`FakeHub`)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, code: int = 200):
        self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        self.server.hub.requests.append(("POST", self.path))
        body = self._body()
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or req.get('namespace') or 'user'}/{req['name']}"
            self.server.hub.repo_dir(repo).mkdir(parents=True, exist_ok=True)
            return self._json({"url": f"{self.server.hub.url}/{repo}", "name": repo})
        if path == "/api/validate-yaml":  # the README's metadata block must be a YAML mapping
            return self._validate(json.loads(body)["content"])
        if m := re.fullmatch(_API_REPO + r"/preupload/(?P<rev>[^/]+)", path):
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if m := re.fullmatch(_API_REPO + r"/commit/(?P<rev>[^/]+)", path):
            return self._commit(m["repo"], body)
        self._json({"error": f"fake hub: no POST {path}"}, 404)

    def _validate(self, content: str):
        import yaml

        head = content.split("---\n")[1] if content.startswith("---\n") else ""
        try:
            ok = isinstance(yaml.safe_load(head), dict)
        except yaml.YAMLError:
            ok = False
        self.server.hub.validated.append(ok)
        if not ok:
            return self._json({"errors": [{"message": "metadata is not a YAML mapping"}]}, 400)
        self._json({"errors": [], "warnings": []})

    def _commit(self, repo: str, body: bytes):
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item.get("key") == "file":
                value = item["value"]
                target = self.server.hub.repo_dir(repo) / value["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
        self.server.hub.commits[repo] = self.server.hub.commits.get(repo, 0) + 1
        sha = self.server.hub.sha(repo)
        self._json(
            {
                "commitUrl": f"{self.server.hub.url}/{repo}/commit/{sha}",
                "commitOid": sha,
                "success": True,
                "commitMessage": "",
            }
        )

    def _info(self, repo: str):
        d = self.server.hub.repo_dir(repo)
        if not d.is_dir():
            return self._json({"error": "Repository not found"}, 404)
        self._json(
            {
                "id": repo,
                "modelId": repo,
                "sha": self.server.hub.sha(repo),
                "private": False,
                "siblings": [{"rfilename": name} for name in self.server.hub.files(repo)],
            }
        )

    def _resolve(self, repo: str, filename: str, head: bool):
        f = self.server.hub.repo_dir(repo) / filename
        if not f.is_file():
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
        data = f.read_bytes()
        self._send(
            200, data, {"X-Repo-Commit": self.server.hub.sha(repo), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, head
        )

    def _get(self, head: bool):
        self.server.hub.requests.append(("HEAD" if head else "GET", self.path))
        path = self.path.split("?")[0]
        if m := re.fullmatch(_API_REPO + r"(/revision/(?P<rev>[^/]+))?", path):
            return self._info(m["repo"])
        if m := re.fullmatch(_API_REPO + r"/tree/(?P<rev>[^/]+)(/.*)?", path):
            return self._json(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in self.server.hub.files(m["repo"]).items()
                ]
            )
        if m := re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
            return self._resolve(m["repo"], m["file"], head)
        if path == "/":
            return self._send(200, b"", head=head)
        self._send(404, b"", head=head)

    def do_GET(self):
        self._get(head=False)

    def do_HEAD(self):
        self._get(head=True)
