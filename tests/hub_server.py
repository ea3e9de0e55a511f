"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests of the download path: it answers the requests
``huggingface_hub`` 2.4.0's ``snapshot_download`` makes, from files held in memory, logs every request, and
cuts a download short or dies mid-file on demand.

What the client asks, as its source reads:

- ``GET /api/models/{repo}/revision/{revision}``: the commit a branch or tag points at (``sha``); skipped when
  the revision is already a 40-hex commit id.
- ``GET /api/models/{repo}/tree/{commit}?recursive=True&expand=False``: the file listing, one page here.
- ``HEAD /{repo}/resolve/{commit}/{file}``: ``X-Repo-Commit`` and ``ETag`` (the git blob id). A file kept in
  LFS answers 302 to a storage host with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``, as the hub
  does; the client does not follow a redirect to another origin, so storage runs on a second port.
- ``GET`` the resolve url, or the storage url of an LFS file; after a cut connection the client tries again,
  asking for a ``Range`` from the last byte it kept. Answering a range is optional in HTTP: this server sends
  the whole file, which the client takes as a restart.

An unknown repo answers 401 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``, a missing file 404
``EntryNotFound``: the ``X-Error-Code`` header is what picks the client's exception.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".msgpack", ".bin")


def fake_commit(label: str) -> str:
    """A stable 40-hex commit id for a label."""
    return hashlib.sha1(label.encode()).hexdigest()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Request:
    host: str  # "hub" or "storage"
    method: str
    path: str  # unquoted, without the query


@dataclass(frozen=True)
class _Cut:
    after: int  # bytes sent before the connection is dropped
    die: bool  # whether the whole server stops listening then


class Hub:
    """Repos by id, each a set of commits (files by name) and branches naming commits. ``start`` listens on
    fresh ports (again after a stop), ``url`` is what ``HF_ENDPOINT`` takes."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.branches: dict[str, dict[str, str]] = {}
        self.requests: list[Request] = []
        self._blobs: dict[str, bytes] = {}  # LFS files by sha256, for storage
        self._cuts: dict[str, _Cut] = {}  # by sha256 of the content
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self._lock = threading.Lock()
        self._dead = False
        self.url = self.storage_url = ""

    def add(self, repo_id: str, commit: str, files: dict[str, bytes], branch: str | None = "main") -> None:
        self.commits.setdefault(repo_id, {})[commit] = dict(files)
        if branch is not None:
            self.branches.setdefault(repo_id, {})[branch] = commit
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self._blobs[hashlib.sha256(data).hexdigest()] = data

    def cut(self, content: bytes, after: int, die: bool = False) -> None:
        """Drop the connection after ``after`` bytes of the next download of ``content``; with ``die``, stop
        listening too, so every retry is refused."""
        self._cuts[hashlib.sha256(content).hexdigest()] = _Cut(after, die)

    def start(self) -> "Hub":
        self._dead = False
        hub = self._serve("hub")
        storage = self._serve("storage")
        self.url, self.storage_url = hub, storage
        return self

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()

    def _serve(self, role: str) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub, server.role = self, role
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut(self, content: bytes) -> _Cut | None:
        with self._lock:
            return self._cuts.pop(hashlib.sha256(content).hexdigest(), None)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with Content-Length, as the client expects

    def log_message(self, format, *args) -> None:  # the request log is Hub.requests
        pass

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        hub: Hub = self.server.hub
        if hub._dead:  # a connection kept alive from before the death gets no answer either
            return self._hang_up()
        path = unquote(urlsplit(self.path).path)
        hub._log(Request(self.server.role, self.command, path))
        if self.server.role == "storage":
            data = hub._blobs.get(path.lstrip("/"))
            return self._send_file(data) if data is not None else self._error(404, "EntryNotFound")
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path):
            return self._api(*match.groups())
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(*match.groups())
        self._error(404, None)

    def _commit(self, repo_id: str, revision: str) -> str | None:
        """The commit a revision names, having sent the hub's error when there is none."""
        hub: Hub = self.server.hub
        if repo_id not in hub.commits:
            self._error(401, "RepoNotFound")
            return None
        commit = hub.branches.get(repo_id, {}).get(revision, revision)
        if commit not in hub.commits[repo_id]:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return commit

    def _api(self, repo_id: str, kind: str, revision: str) -> None:
        commit = self._commit(repo_id, revision)
        if commit is None:
            return
        files = self.server.hub.commits[repo_id][commit]
        if kind == "revision":
            body = {"id": repo_id, "sha": commit, "private": False, "siblings": [{"rfilename": n} for n in files]}
        else:  # folders are listed too, as the hub does
            folders = sorted({name.rsplit("/", 1)[0] for name in files if "/" in name})
            body = [{"type": "directory", "oid": fake_commit(folder), "size": 0, "path": folder} for folder in folders]
            body += [self._tree_entry(name, data) for name, data in sorted(files.items())]
        self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        commit = self._commit(repo_id, revision)
        if commit is None:
            return
        data = self.server.hub.commits[repo_id][commit].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound")
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            return self._send(302, {"Location": f"{self.server.hub.storage_url}/{sha256}", "X-Repo-Commit": commit,
                                    "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))}, b"")
        self._send_file(data, {"X-Repo-Commit": commit, "ETag": f'"{_git_blob_id(data)}"'})

    def _send_file(self, data: bytes, headers: dict | None = None) -> None:
        """The whole file, or part of it then a hang-up when a cut is pending for it."""
        hub: Hub = self.server.hub
        cut = hub._take_cut(data) if self.command == "GET" else None
        if cut is None:
            return self._send(200, headers or {}, data)
        self._send(200, headers or {}, data[: cut.after], length=len(data))
        if cut.die:
            hub._dead = True
            threading.Thread(target=hub.stop).start()
        self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, status: int, code: str | None, message: str | None = None) -> None:
        headers = {"X-Error-Code": code} if code else {}
        if message:
            headers["X-Error-Message"] = message
        self._send(status, {**headers, "Content-Type": "application/json"},
                   json.dumps({"error": message or code or "Not Found"}).encode())

    def _send(self, status: int, headers: dict, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
