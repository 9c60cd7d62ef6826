"""A loopback Hugging Face Hub for tests: just the endpoints `huggingface_hub` 2.4 and transformers use
to create a model repo, upload a folder (preupload + NDJSON commit, every file as a "regular" upload),
list its files and download them (`hf_hub_download`, `from_pretrained`).

    with LoopbackHub(token="hf_test") as hub:   # threaded server on 127.0.0.1, a random free port
        hub.endpoint                            # "http://127.0.0.1:PORT"
        hub.fail_next("commit", times=1)        # fault injection: the next commit answers 500
        hub.files("me/model")                   # {path: bytes} at the head of main

Writes (create, preupload, commit) need ``Authorization: Bearer <token>`` (401 otherwise); reads of a
private repo too. Errors carry the ``X-Error-Code`` headers the client maps to its exceptions
(RepoNotFound, EntryNotFound, RevisionNotFound). Request bodies are bounded (``max_body``); unknown
routes answer 404 and are recorded in ``hub.unhandled``. The `hub` pytest fixture points the
in-process client (and subprocesses, through the environment) at a fresh server and stops it after.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [  # (method, pattern, handler name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),  # huggingface_hub's agent registry: none here
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (what the client computes for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repo: its commits, oldest first, each (sha, {path: bytes})."""

    repo_id: str
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1]

    def at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        if rev == "main":
            return self.head()
        return next((c for c in self.commits if c[0] == rev), None)

    def add_commit(self, files: dict[str, bytes], message: str) -> str:
        parent = self.commits[-1][0] if self.commits else ""
        sha = hashlib.sha1(f"{parent}\n{message}\n{len(self.commits)}".encode()).hexdigest()
        self.commits.append((sha, files))
        return sha


class HubError(Exception):
    """An HTTP error answer: status, X-Error-Code and a message."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class LoopbackHub:
    """In-memory Hub state plus the threaded HTTP server that serves it."""

    def __init__(self, token: str = "hf_loopback_token", user: str = "tester", max_body: int = 64 << 20) -> None:
        self.token, self.user, self.max_body = token, user, max_body
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._faults: dict[str, int] = {}
        self.hang_s = 2.0  # how long a "timeout" fault holds its connection
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LoopbackHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test helpers ------------------------------------------------------------------------
    def fail_next(self, kind: str, times: int = 1) -> None:
        """Answer 500 to the next `times` requests of `kind` ("commit", "preupload", "resolve", ...)."""
        with self._lock:
            self._faults[kind] = times

    def fail_nth(self, n: int, mode: str = "500") -> None:
        """Fail the n-th request from now (1-based): "500" answers a server error, "reset" closes the
        connection without an answer, "timeout" holds it `hang_s` seconds before closing it unanswered
        (a client with a shorter timeout gives up first)."""
        with self._lock:
            self._nth = (len(self.requests) + n, mode)

    def fault_pending(self) -> bool:
        """True while a `fail_nth` fault has not fired yet; clears it."""
        with self._lock:
            pending, self._nth = getattr(self, "_nth", None) is not None, None
            return pending

    def files(self, repo_id: str) -> dict[str, bytes]:
        """{path: content} at the head of main."""
        with self._lock:
            return dict(self.repos[repo_id].head()[1])

    def count(self, kind: str) -> int:
        """How many requests were routed to handler `kind`."""
        return sum(1 for k, _ in self.requests if k == kind)

    # -- request handling (called by _Handler under no lock) ----------------------------------
    def dispatch(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict, bytes]:
        for verb, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                with self._lock:
                    self.requests.append((name, path))
                    nth = getattr(self, "_nth", None)
                    if nth is not None and len(self.requests) == nth[0]:
                        self._nth = None
                        if nth[1] == "reset":
                            raise ConnectionResetByHub(name)
                        if nth[1] == "timeout":
                            raise HangByHub(name)
                        raise HubError(500, f"injected server error on request {nth[0]} ({name})")
                    if self._faults.get(name, 0) > 0:
                        self._faults[name] -= 1
                        raise HubError(500, f"injected server error on {name}")
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, f"_{name}")(method=method, query=query, headers=headers, body=body,
                                                    **args)
        self.unhandled.append((method, path))
        raise HubError(404, f"no route for {method} {path}")

    def _authorized(self, headers) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def _require_write(self, headers) -> None:
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, headers) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(headers)):
            raise HubError(404 if repo is None else 401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _snapshot(self, repo: Repo, rev: str) -> tuple[str, dict[str, bytes]]:
        snap = repo.at(rev)
        if snap is None:
            raise HubError(404, f"Revision {rev} not found in {repo.repo_id}", "RevisionNotFound")
        return snap

    def _create_repo(self, body: bytes, headers, **_) -> tuple[int, dict, bytes]:
        self._require_write(headers)
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            # like the Hub, a 409 still carries the url: create_repo(exist_ok=True) reads it
            raise HubError(409, f"You already created this model repo: {repo_id}", url=f"{self.endpoint}/{repo_id}")
        repo = Repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.add_commit({".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[repo_id] = repo
        return _json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _delete_repo(self, body: bytes, headers, **_) -> tuple[int, dict, bytes]:
        self._require_write(headers)
        payload = json.loads(body or b"{}")
        self.repos.pop(f"{payload.get('organization') or self.user}/{payload['name']}", None)
        return _json(200, {})

    def _validate_yaml(self, **_) -> tuple[int, dict, bytes]:
        return _json(200, {"errors": [], "warnings": []})

    def _agent_harnesses(self, **_) -> tuple[int, dict, bytes]:
        raise HubError(404, "no agent harness registry on the loopback hub")

    def _whoami(self, headers, **_) -> tuple[int, dict, bytes]:
        if not self._authorized(headers):
            raise HubError(401, "Invalid user token")
        return _json(200, {"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token"}})

    def _repo_info(self, repo: str, headers, rev: str = "main", **_) -> tuple[int, dict, bytes]:
        r = self._repo(repo, headers)
        sha, files = self._snapshot(r, rev)
        siblings = [{"rfilename": p} for p in sorted(files)]
        return _json(200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "siblings": siblings,
                           "tags": [], "downloads": 0, "likes": 0})

    def _tree(self, repo: str, rev: str, headers, query: dict, path: str = "", **_) -> tuple[int, dict, bytes]:
        _, files = self._snapshot(self._repo(repo, headers), rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        under = {p: d for p, d in files.items() if p.startswith(prefix)}
        if prefix and not under:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for p, data in sorted(under.items()):
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)})
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        return _json(200, entries)

    def _preupload(self, repo: str, rev: str, headers, body: bytes, **_) -> tuple[int, dict, bytes]:
        self._require_write(headers)
        _, files = self._snapshot(self._repo(repo, headers), rev)
        answer = []
        for f in json.loads(body)["files"]:
            remote = files.get(f["path"])
            answer.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_sha(remote) if remote is not None else None})
        return _json(200, {"files": answer, "commitOid": self._snapshot(self._repo(repo, headers), rev)[0]})

    def _commit(self, repo: str, rev: str, headers, body: bytes, **_) -> tuple[int, dict, bytes]:
        self._require_write(headers)
        r = self._repo(repo, headers)
        if rev != "main":
            raise HubError(400, "the loopback Hub only commits to main")
        files, message = dict(r.head()[1]), ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                if value.get("parentCommit") and value["parentCommit"] != r.head()[0]:
                    raise HubError(412, "parent commit is not the head of main")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                target = value["path"].rstrip("/")
                files = {p: d for p, d in files.items() if p != target and not p.startswith(target + "/")}
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (every upload is regular here)")
        sha = r.add_commit(files, message)
        return _json(200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha,
                           "success": True})

    def _resolve(self, repo: str, rev: str, path: str, headers, method: str, **_) -> tuple[int, dict, bytes]:
        sha, files = self._snapshot(self._repo(repo, headers), rev)
        if path not in files:
            raise HubError(404, f"Entry {path} not found in {repo}", "EntryNotFound")
        data = files[path]
        head = {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data))}
        return 200, head, (b"" if method == "HEAD" else data)


class ConnectionResetByHub(Exception):
    """Raised by `dispatch` to drop the connection without an answer (fault injection)."""


class HangByHub(Exception):
    """Raised by `dispatch` to hold the connection unanswered for `LoopbackHub.hang_s`, then drop it."""


def _json(status: int, payload) -> tuple[int, dict, bytes]:
    data = json.dumps(payload).encode()
    return status, {"Content-Type": "application/json", "Content-Length": str(len(data))}, data


class _Handler(BaseHTTPRequestHandler):
    """Routes every request to `LoopbackHub.dispatch`; keep-alive HTTP/1.1, bounded bodies."""

    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    timeout = 30

    def _handle(self) -> None:
        url = urlsplit(self.path)
        try:
            body = self._read_body()
            status, headers, data = self.hub.dispatch(self.command, url.path, parse_qs(url.query), self.headers, body)
        except (ConnectionResetByHub, HangByHub) as fault:
            if isinstance(fault, HangByHub):
                time.sleep(self.hub.hang_s)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees its connection reset, no answer
            return
        except HubError as err:
            status, headers, data = _json(err.status, {"error": err.message, **err.extra})
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
            if self.command == "HEAD":
                data = b""
        except Exception as err:  # a bug in the fake: answer 500 with the reason, keep serving
            status, headers, data = _json(500, {"error": f"loopback hub bug: {type(err).__name__}: {err}"})
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HubError(411, "chunked request bodies are not supported by the loopback hub")
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            self.close_connection = True
            raise HubError(413, f"request body of {length} bytes exceeds {self.hub.max_body}")
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _handle

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh loopback Hub; the in-process client and child processes (env vars) talk to it.

    Sets HF_TOKEN to the hub's token, disables offline mode, isolates the download cache and token file
    under tmp_path, and resets transformers' shared HfApi so it picks up the endpoint."""
    from huggingface_hub import constants

    server = LoopbackHub().start()
    endpoint = server.endpoint
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agents.json"))
    for key, value in {"HF_ENDPOINT": endpoint, "HF_TOKEN": server.token, "HF_HUB_OFFLINE": "0",
                       "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
                       "HF_HUB_CACHE": str(tmp_path / "hf-cache")}.items():
        monkeypatch.setenv(key, value)
    _reset_transformers_api(monkeypatch)
    try:
        yield server
    finally:
        server.stop()


def _reset_transformers_api(monkeypatch) -> None:
    try:
        import transformers.utils.hub as tf_hub
    except ImportError:
        return
    if hasattr(tf_hub, "_hf_api"):
        monkeypatch.setattr(tf_hub, "_hf_api", None)
