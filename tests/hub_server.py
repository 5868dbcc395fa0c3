"""A small Hugging Face Hub-compatible HTTP server for offline tests (stdlib only).

Why: the test machines have no internet, yet the plugin must be tested end to end with the real
``huggingface_hub`` / ``transformers`` clients (``push_to_hub``, ``from_pretrained``, ``hf_hub_download``,
...). ``LocalHub`` implements the subset of the Hub's HTTP API those clients use, with the request and
response shapes of ``huggingface_hub`` 2.x (read from its source: ``hf_api.py``, ``_commit_api.py``,
``lfs.py``, ``file_download.py``, ``utils/_http.py``):

* ``POST /api/repos/create``
* ``POST /api/validate-yaml``                              model cards are accepted as they are
* ``GET  /api/{models,datasets,spaces}/<repo>[/revision/<rev>]``   repo info (sha, siblings, cardData, ...)
* ``GET  /api/<type>s/<repo>/tree/<rev>[/<path>]``         ``list_repo_tree`` / ``list_repo_files``
* ``POST /api/<type>s/<repo>/preupload/<rev>``             "regular" vs "lfs" upload mode per file
* ``POST /<repo>.git/info/lfs/objects/batch``               LFS batch API -> ``PUT /_lfs/upload/<sha256>``
  (sha256 and size verified) and ``POST /_lfs/verify/<sha256>``
* ``POST /api/<type>s/<repo>/commit/<rev>``                NDJSON commit (file / lfsFile / deletedFile /
  deletedFolder)
* ``HEAD|GET /[datasets/|spaces/]<repo>/resolve/<rev>/<path>``  file download with ``ETag``,
  ``X-Repo-Commit``, ``X-Linked-Etag``/``X-Linked-Size`` (LFS)

Only what the package's tests use (saving, pushing, loading, pinned revisions); branches, tags, pull
requests, commit logs and ranged downloads are not served.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) because that
header, not the status code, is what ``hf_raise_for_status`` maps to ``RepositoryNotFoundError`` & co.
Requests to routes the server does not know get a 404/405 naming the route, are printed to stderr and
are recorded in ``LocalHub.unhandled`` so a test can fail on them: a client silently tolerating a 404
must not hide a missing endpoint.

The client must run in a process whose environment is set *before* ``huggingface_hub`` is imported
(it reads ``HF_ENDPOINT`` & co. at import time): use :func:`hub_env` and :func:`run_python`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "tester"
# The Hub stores files above 10 MB with LFS whatever .gitattributes says.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LFS_MIME = "application/vnd.git-lfs+json"

# Same LFS patterns as the .gitattributes the Hub writes into every new repo (initial commit).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy "
        "*.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* "
        "*.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data``: the ETag the Hub serves for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Git LFS pointer file; its git blob id is the ``oid`` the Hub lists for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(moment: datetime) -> str:
    """The only date format ``huggingface_hub.utils.parse_datetime`` accepts."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _truthy(values: Sequence[str] | None) -> bool:
    """Query flags arrive as ``true``/``True``/``1`` depending on the client."""
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


class HubError(Exception):
    """An HTTP error with the Hub's ``X-Error-Code`` convention."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body: dict[str, Any] = {"error": message}


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit snapshot; its bytes live in the object store under ``sha256``."""

    size: int
    sha256: str
    blob_id: str
    lfs: bool
    pointer_size: int = 0

    @property
    def etag(self) -> str:
        """What the Hub puts in ``ETag``: sha256 for LFS files, git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.blob_id

    @property
    def upload_oid(self) -> str:
        """What ``preupload`` returns as ``oid``: compared to ``CommitOperationAdd._local_oid``."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    """An immutable snapshot ``path -> FileEntry`` plus git-like metadata."""

    oid: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Repo:
    """A repository: commits by oid, branches by name."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


def _parse_scalar(value: str) -> Any:
    """Tiny YAML scalar parser: enough for the front matter transformers writes in model cards."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    if value in ("[]", "{}"):
        return [] if value == "[]" else {}
    if value.startswith("[") and value.endswith("]"):
        return [_parse_scalar(item) for item in value[1:-1].split(",") if item.strip()]
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_card_data(readme: str) -> dict[str, Any] | None:
    """Best-effort ``cardData`` from a README's YAML front matter (stdlib has no YAML parser).

    Handles ``key: scalar``, ``key: [a, b]`` and block lists; keys with nested mappings are dropped
    rather than misreported.
    """
    lines = readme.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---")
    except StopIteration:
        return None
    data: dict[str, Any] = {}
    dropped: set[str] = set()
    key: str | None = None
    for line in lines[1:end]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " -\t" and key is not None:
            item = line.strip()
            if item.startswith("- ") and ": " not in item[2:]:
                current = data.get(key)
                data[key] = [*(current if isinstance(current, list) else []), _parse_scalar(item[2:])]
            else:
                dropped.add(key)
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip()
        data[key] = _parse_scalar(value) if value.strip() else None
    return {k: v for k, v in data.items() if k not in dropped}


class LocalHub:
    """In-memory Hub (metadata) + content-addressed object store on disk, served over HTTP.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``url`` is what the client's
    ``HF_ENDPOINT`` must be. Server-side helpers (:meth:`create_repo`, :meth:`commit_files`,
    :meth:`read_file`, ...) seed or inspect repos without going through a client.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = DEFAULT_USER,
        require_auth: bool = True,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self.user = user
        self.require_auth = require_auth
        self.verbose = verbose
        self._requested_port = port
        self._owns_storage = storage_dir is None
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        #: (method, raw path, status) of every request, in arrival order.
        self.requests: list[tuple[str, str, int]] = []
        #: "METHOD /path" of requests that matched no route (a missing endpoint, most likely).
        self.unhandled: list[str] = []
        #: Tracebacks of requests the server failed on (answered with 500).
        self.errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        """Bind (port 0 = a free port) and serve from a daemon thread."""
        if self._server is not None:
            return self
        if self.storage_dir is None:
            self.storage_dir = Path(tempfile.mkdtemp(prefix="localhub-"))
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        server = _Server((self.host, self._requested_port), _Handler)
        server.hub = self
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"LocalHub:{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; delete the storage dir if this instance created it."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._owns_storage and self.storage_dir is not None:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
            self.storage_dir = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LocalHub is not started")
        return self._port

    @property
    def url(self) -> str:
        """Endpoint for ``HF_ENDPOINT`` (no trailing slash, as ``huggingface_hub`` strips it)."""
        return f"http://{self.host}:{self.port}"

    @property
    def objects_dir(self) -> Path:
        if self.storage_dir is None:
            raise RuntimeError("LocalHub is not started")
        return self.storage_dir / "objects"

    def env(self, hf_home: str | os.PathLike[str], **kwargs: Any) -> dict[str, str]:
        """Shortcut for :func:`hub_env` with this server."""
        return hub_env(self, hf_home, **kwargs)

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.url}/{URL_PREFIXES[repo_type]}{repo_id}"

    # ------------------------------------------------------------------ object store

    def _blob_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256

    def has_object(self, sha256: str) -> bool:
        """Whether content with this sha256 was uploaded (LFS PUT) or committed."""
        return self._blob_path(sha256).is_file()

    def _store_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not path.is_file():
            tmp = path.with_name(f"{sha256}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha256

    @staticmethod
    def _entry_for(data: bytes, sha256: str, lfs: bool) -> FileEntry:
        if lfs:
            pointer = lfs_pointer(sha256, len(data))
            return FileEntry(len(data), sha256, git_blob_sha1(pointer), True, len(pointer))
        return FileEntry(len(data), sha256, git_blob_sha1(data), False)

    def _lfs_entry(self, sha256: str, size: int | None) -> FileEntry:
        path = self._blob_path(sha256)
        if not path.is_file():
            raise HubError(
                400,
                f"Your push was rejected because an LFS pointer pointed to a file that does not exist ({sha256})",
            )
        actual = path.stat().st_size
        if size is not None and size != actual:
            raise HubError(400, f"LFS object {sha256} has size {actual}, commit says {size}")
        pointer = lfs_pointer(sha256, actual)
        return FileEntry(actual, sha256, git_blob_sha1(pointer), True, len(pointer))

    # ------------------------------------------------------------------ repos & revisions

    def _get_repo(self, repo_type: str, repo_id: str, authed: bool = True) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authed):
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        """Branch, full sha or unambiguous sha prefix (>= 7 chars)."""
        oid = repo.branches.get(revision)
        if oid is None and revision.startswith("refs/heads/"):
            oid = repo.branches.get(revision.removeprefix("refs/heads/"))
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None and re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [sha for sha in repo.commits if sha.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _new_commit(
        self, repo: Repo, parent: Commit | None, files: dict[str, FileEntry], title: str, message: str
    ) -> Commit:
        now = datetime.now(UTC)
        seed = (
            json.dumps(
                [
                    parent.oid if parent else None,
                    sorted((p, e.blob_id) for p, e in files.items()),
                    title,
                    message,
                ],
            )
            + f"{now.isoformat()}{uuid.uuid4().hex}"
        )
        commit = Commit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent.oid if parent else None,
            files=files,
            title=title,
            message=message,
            author=self.user,
            date=now,
        )
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo with the Hub's initial commit (``.gitattributes``); returns its URL."""
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        namespace, _, name = repo_id.rpartition("/")
        if not namespace or "/" in namespace or not _REPO_NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {repo_id!r}")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                error = HubError(409, f"You already created this {repo_type} repo")
                error.body["url"] = self.repo_url(repo_id, repo_type)
                raise error
            repo = Repo(repo_type, repo_id, private, datetime.now(UTC))
            data = DEFAULT_GITATTRIBUTES.encode()
            entry = self._entry_for(data, self._store_bytes(data), lfs=False)
            initial = self._new_commit(repo, None, {".gitattributes": entry}, "initial commit", "")
            repo.branches["main"] = initial.oid
            self._repos[(repo_type, repo_id)] = repo
        return self.repo_url(repo_id, repo_type)

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str],
        *,
        deletions: Sequence[str] = (),
        message: str = "Upload files",
        revision: str = "main",
        repo_type: str = "model",
        create_repo: bool = True,
    ) -> str:
        """Seed a repo server-side (no client needed); LFS is chosen like ``preupload`` would. Returns the sha."""
        with self._lock:
            if create_repo and (repo_type, repo_id) not in self._repos:
                self.create_repo(repo_id, repo_type)
            repo = self._get_repo(repo_type, repo_id)
            ops: list[tuple[str, str, FileEntry | None]] = []
            head = self._resolve(repo, revision)
            for path, content in files.items():
                data = content.encode() if isinstance(content, str) else content
                lfs = self._upload_mode(head, path, len(data), data[:512]) == "lfs"
                ops.append(("add", path, self._entry_for(data, self._store_bytes(data), lfs)))
            ops.extend(("deletedFile", path, None) for path in deletions)
            commit = self._apply_commit(repo, revision, ops, message, "", None)
            return commit.oid

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Content of ``path`` at ``revision`` as stored by the server."""
        with self._lock:
            entry = self.files(repo_id, revision, repo_type).get(path)
        if entry is None:
            raise KeyError(path)
        return self._blob_path(entry.sha256).read_bytes()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, FileEntry]:
        """Snapshot ``path -> FileEntry`` at ``revision`` (shows whether a file went through LFS)."""
        with self._lock:
            return dict(self._resolve(self._get_repo(repo_type, repo_id), revision).files)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            return self._resolve(self._get_repo(repo_type, repo_id), revision).oid

    def commit_log(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit: Commit | None = self._resolve(repo, revision)
            log = []
            while commit is not None:
                log.append(commit)
                commit = repo.commits[commit.parent] if commit.parent else None
            return log

    # ------------------------------------------------------------------ commit logic

    def _read_object(self, sha256: str) -> bytes:
        return self._blob_path(sha256).read_bytes()

    def _lfs_patterns(self, commit: Commit | None) -> list[str]:
        """``filter=lfs`` patterns of the revision's .gitattributes (users may add their own)."""
        entry = commit.files.get(".gitattributes") if commit else None
        text = self._read_object(entry.sha256).decode(errors="replace") if entry else DEFAULT_GITATTRIBUTES
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def _upload_mode(self, head: Commit | None, path: str, size: int, sample: bytes) -> str:
        """The Hub's rule: .gitattributes LFS patterns, files > 10 MB, or binary content (NUL byte)."""
        if size == 0:
            return "regular"
        if size > LFS_SIZE_THRESHOLD or b"\x00" in sample:
            return "lfs"
        basename = path.rsplit("/", 1)[-1]
        for pattern in self._lfs_patterns(head):
            target = path if "/" in pattern else basename
            if fnmatch.fnmatchcase(target, pattern.replace("**/", "*")):
                return "lfs"
        return "regular"

    def _is_ignored(self, head: Commit | None, path: str, gitignore: str | None) -> bool:
        if gitignore is None and head is not None and ".gitignore" in head.files:
            gitignore = self._read_object(head.files[".gitignore"].sha256).decode(errors="replace")
        for raw in (gitignore or "").splitlines():
            pattern = raw.strip()
            if not pattern or pattern.startswith(("#", "!")):
                continue
            pattern = pattern.lstrip("/")
            if pattern.endswith("/"):
                if path.startswith(pattern) or f"/{pattern}" in f"/{path}":
                    return True
            elif fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern):
                return True
        return False

    def _apply_commit(
        self,
        repo: Repo,
        revision: str,
        ops: Sequence[tuple[str, str, FileEntry | None]],
        title: str,
        description: str,
        parent_commit: str | None,
    ) -> Commit:
        """Create a commit on the branch ``revision``."""
        head = self._resolve(repo, revision)  # unknown revision: 404 RevisionNotFound
        if revision not in repo.branches:
            raise HubError(400, f"Cannot commit to {revision!r}: commits go on a branch")
        if parent_commit is not None and not head.oid.startswith(parent_commit):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for kind, path, entry in ops:
            path = path.rstrip("/") if kind == "deletedFolder" else path  # folders are sent as "a/"
            _check_path(path)
            if kind == "add":
                assert entry is not None
                files[path] = entry
            elif kind == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif kind == "deletedFolder":
                prefix = path + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
        commit = self._new_commit(repo, head, files, title, description)
        repo.branches[revision] = commit.oid
        return commit

    # ------------------------------------------------------------------ JSON views

    def _tree_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        entry = commit.files.get(path)
        if entry is not None:
            data: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
            if entry.lfs:
                data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        else:
            children = sorted((p, e.blob_id) for p, e in commit.files.items() if p.startswith(path + "/"))
            tree_id = hashlib.sha1(repr(children).encode()).hexdigest()
            data = {"type": "directory", "oid": tree_id, "size": 0, "path": path}
        if expand:
            last = self._last_commit_touching(repo, commit, path)
            data["lastCommit"] = {"id": last.oid, "title": last.title, "date": _iso(last.date)}
        return data

    @staticmethod
    def _last_commit_touching(repo: Repo, commit: Commit, path: str) -> Commit:
        def state(c: Commit) -> Any:
            if path in c.files:
                return c.files[path].blob_id
            return sorted((p, e.blob_id) for p, e in c.files.items() if p.startswith(path + "/"))

        current = commit
        while current.parent is not None and state(repo.commits[current.parent]) == state(commit):
            current = repo.commits[current.parent]
        return current

    def _repo_info(self, repo: Repo, commit: Commit, blobs: bool, expand: list[str]) -> dict[str, Any]:
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = {
                        "sha256": entry.sha256,
                        "size": entry.size,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        readme = commit.files.get("README.md")
        card = parse_card_data(self._read_object(readme.sha256).decode(errors="replace")) if readme else None
        tags = [str(t) for t in (card or {}).get("tags") or [] if isinstance(t, str | int | float)]
        info: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
            if card and isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
                tags.insert(0, card["library_name"])
            if card and isinstance(card.get("pipeline_tag"), str):
                info["pipeline_tag"] = card["pipeline_tag"]
            if any(p.endswith(".safetensors") for p in commit.files):
                tags.append("safetensors")
            config = commit.files.get("config.json")
            if config is not None and config.size < 1_000_000:
                try:
                    parsed = json.loads(self._read_object(config.sha256))
                    info["config"] = {k: parsed[k] for k in ("architectures", "model_type") if k in parsed}
                except (ValueError, TypeError):
                    pass
        elif repo.repo_type == "space":
            info["sdk"] = (card or {}).get("sdk")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return info


def _check_path(path: str) -> None:
    """Reject paths git (and the Hub) would refuse, so a client bug fails loudly."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")


class _Server(ThreadingHTTPServer):
    """Daemon threads and no join on close: idle keep-alive connections must not block ``stop()``."""

    daemon_threads = True
    block_on_close = False
    hub: LocalHub


@dataclass
class _Response:
    status: int = 200
    body: bytes | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    file: Path | None = None


_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_API = r"^/api/(?P<plural>models|datasets|spaces)/" + _REPO
_GIT = r"^/(?:(?P<plural>datasets|spaces)/)?" + _REPO


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to ``LocalHub``; paths are matched raw (still %-encoded), then unquoted per segment."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every response has a Content-Length
    server_version = "LocalHub/1.0"
    timeout = 60
    server: _Server

    routes: list[tuple[frozenset[str], re.Pattern[str], str]] = [
        (frozenset({"POST"}), re.compile(r"^/api/repos/create$"), "create_repo"),
        (frozenset({"POST"}), re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        (frozenset({"GET"}), re.compile(_API + r"/revision/(?P<rev>[^/]+)$"), "repo_info"),
        (frozenset({"GET"}), re.compile(_API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
        (frozenset({"POST"}), re.compile(_API + r"/preupload/(?P<rev>[^/]+)$"), "preupload"),
        (frozenset({"POST"}), re.compile(_API + r"/commit/(?P<rev>[^/]+)$"), "commit"),
        (frozenset({"POST"}), re.compile(_GIT + r"\.git/info/lfs/objects/batch$"), "lfs_batch"),
        (frozenset({"PUT"}), re.compile(r"^/_lfs/upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
        (frozenset({"POST"}), re.compile(r"^/_lfs/verify/(?P<oid>[0-9a-f]{64})$"), "lfs_verify"),
        (frozenset({"GET", "HEAD"}), re.compile(_GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
        # Last: "<ns>/<name>" would also match "<name>/refs" & co. of a namespace-less repo id.
        (frozenset({"GET"}), re.compile(_API + r"$"), "repo_info"),
    ]

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        if self.hub.verbose:
            sys.stderr.write(f"[LocalHub] {self.address_string()} {format % args}\n")

    def _iter_body(self) -> Iterator[bytes]:
        """Request body as chunks: ``Content-Length`` or chunked (httpx streams file uploads chunked)."""
        if self._body_consumed:
            return
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise HubError(400, "Truncated request body")
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc

    def _authed(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ") or not self.hub.require_auth

    def _require_write(self) -> None:
        if not self._authed():
            raise HubError(401, "Invalid credentials in Authorization header (a write needs a token)")

    def _repo(self, match: re.Match[str]) -> Repo:
        plural = match.group("plural") or "models"
        return self.hub._get_repo(_PLURAL_TO_TYPE[plural], unquote(match.group("repo")), self._authed())

    def _dispatch(self) -> None:
        self._body_consumed = False
        method = self.command
        raw_path = urlsplit(self.path).path
        self._query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        try:
            response = self._route(method, raw_path)
        except HubError as exc:
            response = _Response(exc.status, exc.body, dict(exc.headers))
            if exc.code:
                response.headers["X-Error-Code"] = exc.code
            response.headers["X-Error-Message"] = exc.message
        except Exception:
            tb = traceback.format_exc()
            self.hub.errors.append(f"{method} {self.path}\n{tb}")
            sys.stderr.write(f"[LocalHub] internal error on {method} {self.path}\n{tb}")
            response = _Response(500, {"error": f"LocalHub internal error: {tb.strip().splitlines()[-1]}"})
        try:
            for _ in self._iter_body():  # drain what the handler did not read: keeps keep-alive in sync
                pass
        except (HubError, ValueError):
            self.close_connection = True
        with self.hub._lock:
            self.hub.requests.append((method, self.path, response.status))
        self._send(response)

    def _route(self, method: str, raw_path: str) -> _Response:
        allowed: set[str] = set()
        for methods, pattern, name in self.routes:
            match = pattern.match(raw_path)
            if match is None:
                continue
            if method in methods:
                return getattr(self, f"_h_{name}")(match)
            allowed |= methods
        what = f"{method} {raw_path}"
        with self.hub._lock:
            self.hub.unhandled.append(what)
        sys.stderr.write(f"[LocalHub] no route for {what}\n")
        status = 405 if allowed else 404
        return _Response(
            status, {"error": f"LocalHub: no route for {what}"}, {"X-Error-Message": f"no route for {what}"}
        )

    def _send(self, response: _Response) -> None:
        body = response.body
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        length = len(body)
        if response.file is not None:
            length = response.file.stat().st_size
        self.send_response(response.status)
        for name, value in response.headers.items():
            # Header values must be one latin-1 line.
            self.send_header(
                name, " ".join(str(value).split()).encode("latin-1", "replace").decode("latin-1")
            )
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(body)
            return
        with response.file.open("rb") as fh:
            shutil.copyfileobj(fh, self.wfile, 1 << 20)

    def _segment(self, match: re.Match[str], name: str) -> str:
        return unquote(match.group(name))

    def _path(self, match: re.Match[str], name: str = "path") -> str:
        """Repo paths arrive %-encoded per segment (resolve) or as one segment with %2F (tree)."""
        raw = match.group(name) or ""
        return "/".join(unquote(part) for part in raw.split("/")).strip("/")

    # ------------------------------------------------------------------ handlers

    def _h_create_repo(self, match: re.Match[str]) -> _Response:
        self._require_write()
        payload = self._json_body()
        name = payload.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name")
        namespace = payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo_id = f"{namespace}/{name}"
        url = self.hub.create_repo(repo_id, repo_type, private)
        return _Response(body={"url": url, "name": repo_id, "id": self.hub._repos[(repo_type, repo_id)].uid})

    def _h_validate_yaml(self, match: re.Match[str]) -> _Response:
        payload = self._json_body()
        if not isinstance(payload.get("content"), str):
            raise HubError(400, "Missing 'content'")
        return _Response(body={"errors": [], "warnings": []})

    def _h_repo_info(self, match: re.Match[str]) -> _Response:
        with self.hub._lock:
            repo = self._repo(match)
            rev = self._segment(match, "rev") if match.groupdict().get("rev") else "main"
            commit = self.hub._resolve(repo, rev)
            expand = self._query.get("expand", []) + self._query.get("expand[]", [])
            return _Response(
                body=self.hub._repo_info(repo, commit, _truthy(self._query.get("blobs")), expand)
            )

    def _h_tree(self, match: re.Match[str]) -> _Response:
        with self.hub._lock:
            repo = self._repo(match)
            commit = self.hub._resolve(repo, self._segment(match, "rev"))
            base = self._path(match)
            recursive = _truthy(self._query.get("recursive"))
            expand = _truthy(self._query.get("expand"))
            prefix = f"{base}/" if base else ""
            if base and not any(p.startswith(prefix) for p in commit.files):
                raise HubError(
                    404,
                    f"Path {base!r} not found (or not a folder)",
                    "EntryNotFound",
                    {"X-Repo-Commit": commit.oid},
                )
            paths: set[str] = set()
            for path in commit.files:
                if not path.startswith(prefix):
                    continue
                parts = path[len(prefix) :].split("/")
                depth = len(parts) if recursive else 1
                for i in range(1, depth + 1):
                    paths.add(prefix + "/".join(parts[:i]))
            body = [self.hub._tree_entry(repo, commit, p, expand) for p in sorted(paths)]
            return _Response(body=body)

    def _h_preupload(self, match: re.Match[str]) -> _Response:
        self._require_write()
        payload = self._json_body()
        with self.hub._lock:
            repo = self._repo(match)
            head = self.hub._resolve(repo, self._segment(match, "rev"))
            files = []
            for item in payload.get("files", []):
                path = item["path"]
                sample = base64.b64decode(item.get("sample") or "")
                existing = head.files.get(path)
                files.append(
                    {
                        "path": path,
                        "uploadMode": self.hub._upload_mode(head, path, int(item.get("size", 0)), sample),
                        "shouldIgnore": self.hub._is_ignored(head, path, payload.get("gitIgnore")),
                        "oid": existing.upload_oid if existing else None,
                    }
                )
            return _Response(body={"files": files, "commitOid": head.oid})

    def _h_lfs_batch(self, match: re.Match[str]) -> _Response:
        self._require_write()
        payload = self._json_body()
        with self.hub._lock:
            self._repo(match)
        if payload.get("operation") != "upload":
            raise HubError(422, f"LocalHub only implements LFS uploads, got {payload.get('operation')!r}")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            result: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                result["error"] = {"code": 422, "message": "Invalid oid or size"}
                result.update(oid=str(oid), size=size if isinstance(size, int) else -1)
            elif not self.hub.has_object(oid):
                result["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/upload/{oid}?size={size}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/_lfs/verify/{oid}", "expires_in": 3600},
                }
            objects.append(result)  # no "actions": already stored, the client skips the upload
        return _Response(body={"transfer": "basic", "objects": objects}, content_type=_LFS_MIME)

    def _h_lfs_upload(self, match: re.Match[str]) -> _Response:
        oid = match.group("oid")
        expected_size = int((self._query.get("size") or ["-1"])[0])
        hasher = hashlib.sha256()
        size = 0
        tmp = self.hub.objects_dir / f"{oid}.{uuid.uuid4().hex}.upload"
        try:
            with tmp.open("wb") as fh:
                for chunk in self._iter_body():
                    hasher.update(chunk)
                    size += len(chunk)
                    fh.write(chunk)
            if hasher.hexdigest() != oid:
                raise HubError(400, f"sha256 mismatch: expected {oid}, got {hasher.hexdigest()}")
            if expected_size >= 0 and size != expected_size:
                raise HubError(400, f"size mismatch: expected {expected_size}, got {size}")
            os.replace(tmp, self.hub._blob_path(oid))
        finally:
            tmp.unlink(missing_ok=True)
        return _Response(body=b"", headers={"ETag": f'"{hashlib.md5(oid.encode()).hexdigest()}"'})

    def _h_lfs_verify(self, match: re.Match[str]) -> _Response:
        oid = match.group("oid")
        payload = self._json_body()
        path = self.hub._blob_path(oid)
        if not path.is_file() or payload.get("oid") != oid or payload.get("size") != path.stat().st_size:
            raise HubError(404, f"LFS object {oid} not found or wrong size")
        return _Response(body={"success": True})

    def _h_commit(self, match: re.Match[str]) -> _Response:
        self._require_write()
        lines = [line for line in self._body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as exc:
            raise HubError(400, f"Invalid NDJSON commit payload: {exc}") from exc
        if not items or items[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = items[0]["value"]
        ops: list[tuple[str, str, FileEntry | None]] = []
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                data = base64.b64decode(value.get("content", ""))
                ops.append(("add", path, self.hub._entry_for(data, self.hub._store_bytes(data), lfs=False)))
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"Unsupported LFS algo {value.get('algo')!r}")
                ops.append(("add", path, self.hub._lfs_entry(value.get("oid", ""), value.get("size"))))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path, None))
            else:
                raise HubError(400, f"LocalHub: unsupported commit operation {key!r}")
        with self.hub._lock:
            repo = self._repo(match)
            commit = self.hub._apply_commit(
                repo,
                self._segment(match, "rev"),
                ops,
                header.get("summary") or "",
                header.get("description") or "",
                header.get("parentCommit"),
            )
            repo_url = self.hub.repo_url(repo.repo_id, repo.repo_type)
        return _Response(
            body={
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{repo_url}/commit/{commit.oid}",
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    def _h_resolve(self, match: re.Match[str]) -> _Response:
        with self.hub._lock:
            repo = self._repo(match)
            commit = self.hub._resolve(repo, self._segment(match, "rev"))
            path = self._path(match)
            entry = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        headers["ETag"] = f'"{entry.etag}"'
        if entry.lfs:
            # The real Hub answers LFS files with a redirect carrying these; huggingface_hub prefers them.
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        response = _Response(200, b"", headers, "application/octet-stream", self.hub._blob_path(entry.sha256))
        return response


# ---------------------------------------------------------------------- client-side helpers

# Client settings that would leak into (or out of) the isolated test cache / endpoint.
_CLIENT_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")


def hub_env(
    server: LocalHub | str,
    hf_home: str | os.PathLike[str],
    *,
    offline: bool = False,
    token: str = "hf_localhub_test_token",
    **extra: str,
) -> dict[str, str]:
    """Environment for a client subprocess talking to ``server`` with an isolated ``HF_HOME``.

    Why a whole environment: ``huggingface_hub`` reads these at import time, and inherited ``HF_*`` /
    ``TRANSFORMERS_*`` variables (cache paths, offline flags, tokens) would make tests depend on the
    machine, so they are dropped. ``127.0.0.1`` is added to ``NO_PROXY`` because httpx honours proxies.
    ``extra`` adds or overrides variables.
    """
    url = server.url if isinstance(server, LocalHub) else str(server).rstrip("/")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_CLIENT_ENV_PREFIXES)}
    no_proxy = ",".join(
        filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1,localhost"])
    )
    env.update(
        HF_ENDPOINT=url,
        HF_TOKEN=token,
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",  # no Xet server here: force the LFS upload path and plain HTTP downloads
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_python(
    code: str,
    env: Mapping[str, str],
    timeout: float = 180,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh ``sys.executable``; raise with full stdout/stderr on failure.

    Why a subprocess: the calling process has usually imported ``huggingface_hub`` already, with other
    settings, and its import-time configuration cannot be changed afterwards. The code is run from a
    temporary file (with ``sys.path[0] == ""`` as for ``python -c``) so a failing ``assert`` shows its
    source line in the traceback.
    """
    source = textwrap.dedent(code)
    numbered = "\n".join(f"{i:4d} | {line}" for i, line in enumerate(source.splitlines(), start=1))
    bootstrap = (
        "import sys; path = sys.argv.pop(1); "
        "exec(compile(open(path).read(), path, 'exec'), {'__name__': '__main__', '__file__': path})"
    )
    with tempfile.TemporaryDirectory(prefix="hub-client-") as tmp:
        script = Path(tmp) / "client_code.py"
        script.write_text(source)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", bootstrap, str(script)],
                env=dict(env),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"client subprocess timed out after {timeout}s\n--- code ---\n{numbered}\n"
                f"--- stdout ---\n{exc.stdout or ''}\n--- stderr ---\n{exc.stderr or ''}"
            ) from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"client subprocess failed with exit code {proc.returncode}\n--- code ---\n{numbered}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def last_json_line(stdout: str) -> Any:
    """Parse the last stdout line that is JSON: how client subprocesses report results to the test."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise ValueError(f"no JSON line in output:\n{stdout}")
