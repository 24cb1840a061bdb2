"""A local stand-in for the Hugging Face hub's HTTP API: the part huggingface_hub's `model_info`,
`hf_hub_download` and `snapshot_download` use (repository info and file tree with sizes, HEAD + GET of a
file at a revision, RepoNotFound/EntryNotFound errors). The real client talks to it over HTTP.

A repository maps each path to its bytes, or to a size alone: listed (as a published multi-GB file is)
but refused if requested, so a test sees any download it did not expect.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

Files = Mapping[str, bytes | int]


def commit_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    """A local folder as a repository: every file under it, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    """`with FakeHub(repos) as hub:` serves at `hub.endpoint`; `hub.requests` logs (method, path)."""

    def __init__(self, repos: Mapping[str, Files], *, delay_s: float = 0.0):
        self.repos = repos
        self.delay_s = delay_s  # before every answer: a slow link
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> set[tuple[str, str]]:
        """(repo, path) of every file fetched with GET."""
        found = set()
        for method, path in self.requests:
            repo, _, rest = path.strip("/").partition("/resolve/")
            if method == "GET" and rest:
                found.add((repo, rest.split("/", 1)[1]))
        return found

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the requests are kept in hub.requests
                return

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, *, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                time.sleep(hub.delay_s)
                if path.startswith("/api/models/"):  # model_info (revision/...) or list_repo_tree (tree/...)
                    repo = path.removeprefix("/api/models/").partition("/revision/")[0]
                    repo, _, tree = repo.partition("/tree/")
                    if repo not in hub.repos:
                        return self._error(404, "RepoNotFound", "Repository not found", body)
                    sizes = {name: len(data) if isinstance(data, bytes) else data for name, data in hub.repos[repo].items()}
                    if tree:
                        answer = [{"type": "file", "path": name, "size": size, "oid": commit_of(name)}
                                  for name, size in sizes.items()]  # fmt: skip
                    else:
                        siblings = [{"rfilename": name, "size": size} for name, size in sizes.items()]
                        answer = {"id": repo, "sha": commit_of(repo), "siblings": siblings}
                    return self._send(200, json.dumps(answer).encode(), body, {"Content-Type": "application/json"})
                repo, _, rest = path.strip("/").partition("/resolve/")
                revision, _, name = rest.partition("/")
                if repo not in hub.repos or revision not in ("main", commit_of(repo)):
                    return self._error(404, "RepoNotFound", "Repository not found", body)
                data = hub.repos[repo].get(name)
                if data is None:
                    return self._error(404, "EntryNotFound", f"{name} not found", body)
                if not isinstance(data, bytes):
                    return self._error(403, "Forbidden", f"the fake hub does not serve {name}", body)
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                self._send(200, data, body, {"ETag": etag, "X-Repo-Commit": commit_of(repo)})

            def _error(self, status: int, code: str, message: str, body: bool) -> None:
                self._send(status, json.dumps({"error": message}).encode(), body,
                           {"X-Error-Code": code, "X-Error-Message": message})  # fmt: skip

            def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
