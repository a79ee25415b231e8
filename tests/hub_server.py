"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

It speaks the part of the Hub HTTP API that ``huggingface_hub`` (2.x, with ``HF_HUB_DISABLE_XET=1``) and
transformers use to push a model repository and to download from it::

    POST     /api/repos/create                            create a repo (409 when it exists)
    GET      /api/models/{repo}[/revision/{rev}]          repo info: commit sha, file list ("siblings")
    GET      /api/models/{repo}/tree/{rev}[/{path}]       file listing (always recursive, one page)
    POST     /api/validate-yaml                           README metadata check before a commit
    POST     /api/models/{repo}/preupload/{rev}           per file: upload mode "regular" or "lfs", current oid
    POST     /{repo}.git/info/lfs/objects/batch           LFS batch: where to PUT each new object
    PUT      /lfs/{oid}            POST /lfs/{oid}/verify LFS basic transfer, then verify
    POST     /api/models/{repo}/branch/{branch}           create a branch from main
    POST     /api/models/{repo}/commit/{rev}              NDJSON commit: base64 files inline, LFS files by oid
    HEAD/GET /{repo}/resolve/{rev}/{path}                 download, with ETag, X-Repo-Commit, Content-Length

Writes need ``Authorization: Bearer <token>`` with a known token whose user owns the namespace; reads of a
private repo need its owner's token. Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers that
``huggingface_hub.utils.hf_raise_for_status`` turns into its typed errors (``RepositoryNotFoundError``,
``EntryNotFoundError``, ...). :meth:`HubServer.inject_fault` makes chosen requests fail (HTTP 500 or a dropped
connection) to test error paths. Every request is recorded in :attr:`HubServer.requests`.

Examples::

    >>> with HubServer(tokens={"hf_write": "me"}) as hub:
    ...     api = huggingface_hub.HfApi(endpoint=hub.url, token="hf_write")
    ...     api.create_repo("me/tiny")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

#: files stored with LFS whatever their size, as in the ``.gitattributes`` the Hub puts in every new model repo
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".pkl", ".zip")
#: larger files always go through LFS (the Hub's limit for regular git files)
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", r"/lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class HubError(Exception):
    """An HTTP error response: status, ``X-Error-Code`` (may be empty), message and extra JSON fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub reports for a file: sha256 of the content for LFS files, git blob sha1 otherwise."""
        if self.lfs:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def lfs_pointer(self) -> bytes:
        """The small text file git stores in place of an LFS file."""
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            self.oid.encode(),
            len(self.data),
        )


@dataclass
class Repo:
    owner: str
    private: bool
    #: commit oid -> files (path -> content) of that commit
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    #: branch -> commit oid
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> tuple[str, dict[str, StoredFile]]:
        """(commit oid, files) of a branch name or full commit oid."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return oid, self.commits[oid]


@dataclass
class Fault:
    """Make the next ``times`` requests matching ``method`` and ``path`` (a regex searched in the path) fail."""

    method: str
    path: str
    action: int | str  # an HTTP status, or "drop" to close the connection without answering
    times: int = 1


class HubServer:
    """The server, in a background thread, on ``127.0.0.1`` at a free port; use as a context manager.

    Args:
        tokens: token -> user name. A user may write to its own namespace only.
        lfs_min_size: files at least this large go through LFS whatever their suffix.
    """

    def __init__(self, tokens: dict[str, str], lfs_min_size: int = LFS_MIN_SIZE) -> None:
        self.tokens = dict(tokens)
        self.lfs_min_size = lfs_min_size
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.reset()

    def reset(self) -> None:
        """Forget all repos, LFS objects, faults and recorded requests."""
        with self._lock:
            self.repos: dict[str, Repo] = {}
            self.lfs_objects: dict[str, bytes] = {}  # oid -> content, uploaded and verified
            self._lfs_expected: dict[str, int] = {}  # oid -> size, announced by an authorised batch request
            self.faults: list[Fault] = []
            #: (method, path, status) of every request; status "drop" for dropped connections
            self.requests: list[tuple[str, str, int | str]] = []
            self._commit_counter = 0

    def inject_fault(self, method: str, path: str, action: int | str = 500, times: int = 1) -> None:
        """Fail the next ``times`` ``method`` requests whose path matches the regex ``path``.

        ``action`` is an HTTP status (e.g. 500) or ``"drop"`` (read the request, close the connection, no answer).
        """
        with self._lock:
            self.faults.append(Fault(method, path, action, times))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Content of every file of ``repo_id`` at ``revision``."""
        with self._lock:
            return {path: f.data for path, f in self.repos[repo_id].resolve(revision)[1].items()}

    def commit_count(self, repo_id: str) -> int:
        """Number of commits in ``repo_id``, the initial one included."""
        with self._lock:
            return len(self.repos[repo_id].commits)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # -- request handling (called by _Handler with the lock held) ----------------------------------------------

    def _take_fault(self, method: str, path: str) -> int | str | None:
        for fault in self.faults:
            if fault.method == method and re.search(fault.path, path):
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault.action
        return None

    def _user(self, headers: Any) -> str | None:
        """The user of the bearer token; 401 for a token we do not know, None without a token."""
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "", "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _writer(self, headers: Any, namespace: str) -> str:
        user = self._user(headers)
        if user is None:
            raise HubError(401, "", "You must be authenticated (pass a token with write access) to write to the Hub")
        if user != namespace:
            raise HubError(403, "", f"You don't have the rights to create or write to {namespace!r}")
        return user

    def _readable_repo(self, headers: Any, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self._user(headers) != repo.owner):
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def _writable_repo(self, headers: Any, repo_id: str) -> Repo:
        self._writer(headers, repo_id.split("/")[0])
        return self._readable_repo(headers, repo_id)

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile]) -> str:
        self._commit_counter += 1
        oid = hashlib.sha1(f"{parent}:{self._commit_counter}".encode()).hexdigest()
        repo.commits[oid] = files
        return oid

    def create_repo(self, headers: Any, body: bytes, **_: str) -> tuple[int, dict, Any]:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "", "this test server only hosts model repos")
        namespace = payload.get("organization") or self._user(headers) or ""
        self._writer(headers, namespace)
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "", "You already created this model repo", url=f"{self.url}/{repo_id}")
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = Repo(owner=namespace, private=private)
        repo.branches["main"] = self._new_commit(repo, None, {".gitattributes": StoredFile(GITATTRIBUTES, False)})
        self.repos[repo_id] = repo
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, headers: Any, body: bytes, **_: str) -> tuple[int, dict, Any]:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return 400, {}, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}
        if not isinstance(metadata, dict | None):
            return 400, {}, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def repo_info(self, headers: Any, body: bytes, repo: str, rev: str | None) -> tuple[int, dict, Any]:
        stored = self._readable_repo(headers, repo)
        oid, files = stored.resolve(unquote(rev or "main"))
        siblings = [{"rfilename": path, "size": len(f.data)} for path, f in sorted(files.items())]
        return 200, {}, {"id": repo, "modelId": repo, "sha": oid, "private": stored.private, "siblings": siblings}

    def tree(self, headers: Any, body: bytes, repo: str, rev: str, path: str | None) -> tuple[int, dict, Any]:
        """Every file under ``path`` (always recursive, one page)."""
        _, files = self._readable_repo(headers, repo).resolve(unquote(rev))
        prefix = unquote(path).rstrip("/") + "/" if path else ""
        listing = [
            {"type": "file", "path": name, "size": len(f.data), "oid": f.oid}
            | ({"lfs": {"oid": f.oid, "size": len(f.data), "pointerSize": len(f.lfs_pointer)}} if f.lfs else {})
            for name, f in sorted(files.items())
            if name.startswith(prefix)
        ]
        return 200, {}, listing

    def preupload(self, headers: Any, body: bytes, repo: str, rev: str) -> tuple[int, dict, Any]:
        _, files = self._writable_repo(headers, repo).resolve(unquote(rev))
        answer = []
        for item in json.loads(body)["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= self.lfs_min_size
            current = files.get(item["path"])
            oid = current.oid if current is not None and current.lfs == lfs else None
            answer.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {}, {"files": answer}

    def create_branch(self, headers: Any, body: bytes, repo: str, branch: str) -> tuple[int, dict, Any]:
        stored = self._writable_repo(headers, repo)
        branch = unquote(branch)
        if branch in stored.branches:
            raise HubError(409, "", f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        stored.branches[branch] = stored.resolve(start)[0]
        return 200, {}, {}

    def lfs_batch(self, headers: Any, body: bytes, repo: str) -> tuple[int, dict, Any]:
        self._writable_repo(headers, repo)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "", "only LFS uploads are supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.lfs_objects:
                self._lfs_expected[oid] = size
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs/{oid}"},
                    "verify": {"href": f"{self.url}/lfs/{oid}/verify"},
                }
            objects.append(entry)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def lfs_put(self, headers: Any, body: bytes, oid: str) -> tuple[int, dict, Any]:
        # like a pre-signed storage URL, the PUT carries no token: only objects announced by a batch are accepted
        if self._lfs_expected.get(oid) != len(body) or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "", f"LFS object {oid}: content does not match the announced oid/size")
        self.lfs_objects[oid] = body
        return 200, {"ETag": f'"{oid}"'}, None

    def lfs_verify(self, headers: Any, body: bytes, oid: str) -> tuple[int, dict, Any]:
        if self._user(headers) is None:
            raise HubError(401, "", "You must be authenticated to verify an LFS upload")
        payload = json.loads(body)
        if (
            payload["oid"] != oid
            or len(self.lfs_objects.get(oid, b"")) != payload["size"]
            or oid not in self.lfs_objects
        ):
            raise HubError(404, "", f"LFS object {oid} was not uploaded")
        return 200, {}, {}

    def commit(self, headers: Any, body: bytes, repo: str, rev: str) -> tuple[int, dict, Any]:
        stored = self._writable_repo(headers, repo)
        branch = unquote(rev)
        if branch not in stored.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch} (commits go to a branch)")
        parent, files = stored.resolve(branch)
        files = dict(files)
        header: dict[str, Any] = {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "", f"{value['path']}: unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubError(422, "", f"{value['path']}: LFS object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
            else:
                raise HubError(400, "", f"unsupported commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "", "a commit needs a summary (commit message)")
        if header.get("parentCommit") not in (None, parent):
            raise HubError(412, "", "A commit has happened since; parentCommit is not the head of the branch")
        oid = self._new_commit(stored, parent, files)
        stored.branches[branch] = oid
        return 200, {}, {"commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}", "pullRequestUrl": None}

    def resolve(self, headers: Any, body: bytes, repo: str, rev: str, path: str) -> tuple[int, dict, Any]:
        oid, files = self._readable_repo(headers, repo).resolve(unquote(rev))
        stored = files.get(unquote(path))
        if stored is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}")
        data, status = stored.data, 200
        response_headers = {"ETag": f'"{stored.oid}"', "X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        ranged = re.fullmatch(r"bytes=(\d+)-", headers.get("Range", ""))
        if ranged:  # resuming an interrupted download
            start = int(ranged.group(1))
            response_headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        return status, response_headers, data


def use_as_hub(monkeypatch: Any, url: str, hf_home: str | Path) -> None:
    """Point huggingface_hub and transformers at ``url`` with a fresh ``HF_HOME``, for one test (pytest monkeypatch).

    ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_DISABLE_XET`` once, at import, and
    two clients are built from them at import or first use: ``huggingface_hub.hf_api.api`` (behind
    ``huggingface_hub.create_repo``, ``ModelCard.push_to_hub``, ...) and transformers' shared
    ``transformers.utils.hub.hf_api()`` (behind ``push_to_hub``). Downloads (``hf_hub_download``, transformers'
    ``cached_file``) read the constants at each call. So we patch the constants, the module-level client and
    transformers' cached client, and set the environment variables for any subprocess. Xet is disabled, so large
    files go through the classic LFS batch + PUT + verify flow that :class:`HubServer` implements.
    """
    import huggingface_hub
    import transformers.utils.hub
    from huggingface_hub import constants

    hf_home, old_home = str(hf_home), constants.HF_HOME
    for name, value in list(vars(constants).items()):  # HF_HUB_CACHE, HF_TOKEN_PATH, ... all live under HF_HOME
        if name.isupper() and isinstance(value, str) and value.startswith(old_home):
            monkeypatch.setattr(constants, name, hf_home + value[len(old_home) :])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    for name, value in {"HF_ENDPOINT": url, "HF_HOME": hf_home, "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet; requests are recorded instead
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        body = self._read_body()
        with hub._lock:
            fault = hub._take_fault(self.command, url.path)
            if fault == "drop":
                hub.requests.append((self.command, url.path, "drop"))
                self.close_connection = True
                return
            try:
                if fault is not None:
                    raise HubError(int(fault), "", "Injected server error")
                status, headers, payload = self._dispatch(hub, url.path, body)
            except HubError as err:
                status, payload = err.status, {"error": err.message, **err.extra}
                headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
            hub.requests.append((self.command, url.path, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        headers.setdefault(
            "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        )
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self, hub: HubServer, path: str, body: bytes) -> tuple[int, dict, Any]:
        for method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if method == self.command and match:
                return getattr(hub, name)(self.headers, body, **match.groupdict())
        raise HubError(404, "", f"the test Hub server does not implement {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _handle


#: tokens of the shared test Hub below: user "me", and the organisation of the demo's default model
FIXTURE_TOKENS = {"hf_test_token_me": "me", "hf_test_token_st": "sentence-transformers"}


@pytest.fixture(scope="module")
def hub_server() -> Any:
    """A :class:`HubServer` for the tests of one module (import this fixture and ``fake_hub`` into it)."""
    with HubServer(tokens=FIXTURE_TOKENS) as server:
        yield server


@pytest.fixture
def fake_hub(hub_server: HubServer, monkeypatch: Any, tmp_path: Path) -> HubServer:
    """The test server, emptied, as the Hub of huggingface_hub and transformers; ``$HF_TOKEN`` of user "me"."""
    hub_server.reset()
    use_as_hub(monkeypatch, hub_server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_me")
    return hub_server
