"""Tests of ``hub_server.LocalHub`` against the real ``huggingface_hub`` and ``transformers`` clients.

Why: every Hub test of the plugin trusts this server. If it drifted from what the clients expect (a
missing header, a wrong ETag, a stale revision), those tests would pass or fail for the wrong reasons.
Client code runs in subprocesses (``run_python``) because ``huggingface_hub`` reads ``HF_ENDPOINT`` & co.
at import time; assertions on the client side are plain ``assert`` (a failure raises with the full
output), assertions on the server side inspect ``LocalHub`` state directly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hub_server import LocalHub, git_blob_sha1, hub_env, last_json_line, parse_card_data, run_python


def _request(
    hub: LocalHub, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Raw HTTP call: lets tests check headers/status without any client-side interpretation."""
    req = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_hf_api_upload_download_and_revisions(hub: LocalHub, tmp_path: Path) -> None:
    upload = tmp_path / "upload"
    (upload / "sub").mkdir(parents=True)
    weights = os.urandom(300_000)  # binary + *.bin pattern -> must take the LFS path
    (upload / "weights.bin").write_bytes(weights)
    (upload / "notes.txt").write_text("first version\n")
    (upload / "sub" / "config.json").write_text('{"a": 1}\n')

    env = hub_env(hub, tmp_path / "hf_home", TEST_DIR=str(tmp_path))
    proc = run_python(
        """
        import hashlib, json, os
        from pathlib import Path
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.hf_api import RepoFolder

        work = Path(os.environ["TEST_DIR"])
        api = HfApi()

        # Namespace-less name -> the token's user; a second create is a 409 unless exist_ok.
        url = api.create_repo("roundtrip")
        assert url.repo_id == "tester/roundtrip", url
        assert url.startswith(os.environ["HF_ENDPOINT"] + "/"), url
        try:
            api.create_repo("tester/roundtrip")
            raise AssertionError("second create_repo should fail")
        except HfHubHTTPError as err:
            assert err.response.status_code == 409, err
        assert api.create_repo("tester/roundtrip", exist_ok=True).repo_id == "tester/roundtrip"

        repo = "tester/roundtrip"
        c1 = api.upload_folder(folder_path=work / "upload", repo_id=repo, commit_message="first")
        assert len(c1.oid) == 40 and int(c1.oid, 16) >= 0

        info = api.model_info(repo, files_metadata=True)
        assert info.id == repo and info.sha == c1.oid, (info.id, info.sha, c1.oid)
        siblings = {s.rfilename: s for s in info.siblings}
        assert set(siblings) == {".gitattributes", "notes.txt", "weights.bin", "sub/config.json"}, siblings
        weights = (work / "upload" / "weights.bin").read_bytes()
        assert siblings["weights.bin"].lfs is not None
        assert siblings["weights.bin"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
        assert siblings["weights.bin"].size == len(weights)
        assert siblings["notes.txt"].lfs is None

        # ETag: git blob sha1 for regular files, sha256 for LFS files; X-Repo-Commit = resolved sha.
        meta = get_hf_file_metadata(hf_hub_url(repo, "notes.txt"))
        assert meta.commit_hash == c1.oid and meta.size == len(b"first version\\n"), meta
        meta_lfs = get_hf_file_metadata(hf_hub_url(repo, "weights.bin"))
        assert meta_lfs.etag == hashlib.sha256(weights).hexdigest() and meta_lfs.size == len(weights), meta_lfs

        assert Path(hf_hub_download(repo, "notes.txt")).read_text() == "first version\\n"
        assert Path(hf_hub_download(repo, "weights.bin")).read_bytes() == weights
        assert Path(hf_hub_download(repo, "sub/config.json")).read_text() == '{"a": 1}\\n'

        snap = Path(snapshot_download(repo, cache_dir=work / "snap_cache"))
        assert snap.name == c1.oid
        got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
        assert set(got) == set(siblings) and got["weights.bin"] == weights, sorted(got)

        assert api.list_repo_files(repo) == sorted(siblings)
        top = {entry.path: entry for entry in api.list_repo_tree(repo)}
        assert set(top) == {".gitattributes", "notes.txt", "weights.bin", "sub"} and isinstance(top["sub"], RepoFolder)
        assert [e.path for e in api.list_repo_tree(repo, path_in_repo="sub")] == ["sub/config.json"]
        assert api.repo_exists(repo) and not api.repo_exists("tester/no-such-repo")
        assert api.file_exists(repo, "sub/config.json") and not api.file_exists(repo, "nope.txt")

        # Second commit: main moves, the first sha still serves the old content (fresh caches).
        c2 = api.upload_file(path_or_fileobj=b"second version\\n", path_in_repo="notes.txt", repo_id=repo)
        assert c2.oid != c1.oid and api.model_info(repo).sha == c2.oid
        assert Path(hf_hub_download(repo, "notes.txt")).read_text() == "second version\\n"
        old = hf_hub_download(repo, "notes.txt", revision=c1.oid, cache_dir=work / "cache_old")
        assert Path(old).read_text() == "first version\\n"
        assert api.model_info(repo, revision=c1.oid).sha == c1.oid
        assert Path(hf_hub_download(repo, "weights.bin", revision=c2.oid, cache_dir=work / "cache_new")).read_bytes() == weights

        print(json.dumps({"c1": c1.oid, "c2": c2.oid}))
        """,
        env,
    )
    shas = last_json_line(proc.stdout)

    # Server side: the binary went through LFS batch + PUT (not inline base64), the text did not.
    weights_sha = hashlib.sha256(weights).hexdigest()
    assert hub.files("tester/roundtrip", shas["c1"])["weights.bin"].lfs
    assert not hub.files("tester/roundtrip", shas["c1"])["notes.txt"].lfs
    assert any(m == "PUT" and p.startswith(f"/_lfs/upload/{weights_sha}") for m, p, _ in hub.requests)
    assert hub.read_file("tester/roundtrip", "notes.txt", shas["c1"]) == b"first version\n"
    assert hub.read_file("tester/roundtrip", "notes.txt") == b"second version\n"
    assert hub.head("tester/roundtrip") == shas["c2"]


def test_error_types_match_huggingface_hub(hub: LocalHub, tmp_path: Path) -> None:
    hub.commit_files("tester/errors", {"present.txt": "here\n"})
    hub.create_repo("tester/secret", private=True)
    proc = run_python(
        """
        import json
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi()
        results = {}

        def expect(name, exc_type, fn):
            try:
                fn()
            except Exception as err:  # the exact class is the point of the test
                assert type(err) is exc_type, f"{name}: {type(err).__mro__} {err}"
                assert err.response.status_code == 404, (name, err.response.status_code)
                results[name] = type(err).__name__
                return
            raise AssertionError(f"{name}: no error raised")

        # Sanity: the repo really is there, so the errors below are about what they say.
        assert Path(hf_hub_download("tester/errors", "present.txt")).read_text() == "here\\n"
        expect("info_missing_repo", RepositoryNotFoundError, lambda: api.model_info("tester/nope"))
        expect("download_missing_repo", RepositoryNotFoundError, lambda: hf_hub_download("tester/nope", "x.txt"))
        expect("download_missing_file", RemoteEntryNotFoundError, lambda: hf_hub_download("tester/errors", "x.txt"))
        expect("tree_missing_folder", RemoteEntryNotFoundError,
               lambda: list(api.list_repo_tree("tester/errors", path_in_repo="no-dir")))
        expect("download_bad_revision", RevisionNotFoundError,
               lambda: hf_hub_download("tester/errors", "present.txt", revision="no-branch"))
        expect("info_bad_revision", RevisionNotFoundError,
               lambda: api.model_info("tester/errors", revision="no-branch"))
        # Private repos: visible with a token, "not found" without one (like the Hub).
        assert api.model_info("tester/secret").private is True
        expect("private_without_token", RepositoryNotFoundError, lambda: api.model_info("tester/secret", token=False))
        print(json.dumps(results))
        """,
        hub_env(hub, tmp_path / "hf_home"),
    )
    assert last_json_line(proc.stdout) == {
        "info_missing_repo": "RepositoryNotFoundError",
        "download_missing_repo": "RepositoryNotFoundError",
        "download_missing_file": "RemoteEntryNotFoundError",
        "tree_missing_folder": "RemoteEntryNotFoundError",
        "download_bad_revision": "RevisionNotFoundError",
        "info_bad_revision": "RevisionNotFoundError",
        "private_without_token": "RepositoryNotFoundError",
    }


def test_raw_http_headers_and_lfs_checks(hub: LocalHub) -> None:
    content, blob = b"0123456789", b"\x00binary" * 100
    sha = hub.commit_files("tester/raw", {"data.txt": content, "blob.bin": blob})

    status, headers, _ = _request(hub, "HEAD", "/tester/raw/resolve/main/data.txt")
    assert status == 200
    assert headers["ETag"] == f'"{git_blob_sha1(content)}"' and "X-Linked-Etag" not in headers
    assert headers["X-Repo-Commit"] == sha and headers["Content-Length"] == "10"

    # LFS file: ETag and X-Linked-Etag are the sha256 (what the cache names blobs by), X-Linked-Size its size.
    assert hub.files("tester/raw")["blob.bin"].lfs
    status, headers, _ = _request(hub, "HEAD", "/tester/raw/resolve/main/blob.bin")
    blob_etag = f'"{hashlib.sha256(blob).hexdigest()}"'
    assert (status, headers["ETag"], headers["X-Linked-Etag"]) == (200, blob_etag, blob_etag)
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(blob))

    status, _, body = _request(hub, "GET", f"/tester/raw/resolve/{sha}/data.txt")
    assert (status, body) == (200, content)

    for path, code in [
        ("/tester/raw/resolve/main/missing.txt", "EntryNotFound"),
        ("/tester/no-such-repo/resolve/main/data.txt", "RepoNotFound"),
        ("/tester/raw/resolve/no-branch/data.txt", "RevisionNotFound"),
    ]:
        status, headers, _ = _request(hub, "HEAD", path)
        assert (status, headers.get("X-Error-Code")) == (404, code), path
    assert _request(hub, "HEAD", "/tester/raw/resolve/main/missing.txt")[1]["X-Repo-Commit"] == sha

    # LFS PUT: content must hash to the announced oid; chunked bodies (what httpx streams) work.
    good = b"lfs object payload"
    oid = hashlib.sha256(good).hexdigest()
    status, _, _ = _request(hub, "PUT", f"/_lfs/upload/{oid}?size={len(good)}", body=b"tampered payload!!")
    assert status == 400 and not hub.has_object(oid)
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    conn.request(
        "PUT", f"/_lfs/upload/{oid}?size={len(good)}", body=iter([good[:5], good[5:]]), encode_chunked=True
    )
    assert conn.getresponse().status == 200 and hub.has_object(oid)
    conn.close()

    # Writes need a token; reads do not.
    status, _, _ = _request(hub, "POST", "/api/models/tester/raw/commit/main", body=b'{"key": "header"}\n')
    assert status == 401
    assert _request(hub, "GET", "/api/models/tester/raw")[0] == 200

    # Unknown routes are answered (not hung), named, and recorded so fixtures can fail on them.
    status, _, body = _request(hub, "GET", "/api/definitely-not-a-route")
    assert status == 404 and b"/api/definitely-not-a-route" in body
    assert hub.unhandled.pop() == "GET /api/definitely-not-a-route"


@pytest.mark.slow
def test_transformers_push_to_hub_and_from_pretrained(hub: LocalHub, tmp_path: Path) -> None:
    push_env = hub_env(hub, tmp_path / "home_push", TEST_DIR=str(tmp_path))
    proc = run_python(
        """
        import json, os
        import numpy as np
        import torch
        from PIL import Image
        from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

        torch.manual_seed(0)
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        model = ResNetForImageClassification(config).eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        model_commit = model.push_to_hub("tester/tiny-resnet")

        processor = ConvNextImageProcessorPil(
            size={"shortest_edge": 40}, image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7]
        )
        image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8))
        pixels = processor(images=image, return_tensors="pt").pixel_values
        processor_commit = processor.push_to_hub("tiny-resnet")  # no namespace: the token's user
        torch.save({"x": x, "logits": logits, "pixels": pixels}, os.path.join(os.environ["TEST_DIR"], "ref.pt"))
        print(json.dumps({
            "model_commit": model_commit.oid,
            "processor_commit": processor_commit.oid,
            "processor_repo": processor_commit.repo_url.repo_id,
        }))
        """,
        push_env,
    )
    pushed = last_json_line(proc.stdout)
    assert pushed["processor_repo"] == "tester/tiny-resnet"
    files = hub.files("tester/tiny-resnet")
    assert hub.head("tester/tiny-resnet") == pushed["processor_commit"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    assert "model.safetensors" in hub.files("tester/tiny-resnet", pushed["model_commit"])
    config = json.loads(hub.read_file("tester/tiny-resnet", "config.json"))
    assert config["architectures"] == ["ResNetForImageClassification"]

    load = """
        import json, os
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        ref = torch.load(os.path.join(os.environ["TEST_DIR"], "ref.pt"))
        model = AutoModelForImageClassification.from_pretrained("tester/tiny-resnet").eval()
        with torch.no_grad():
            logits = model(pixel_values=ref["x"]).logits
        assert torch.equal(logits, ref["logits"]), (logits, ref["logits"])
        processor = AutoImageProcessor.from_pretrained("tester/tiny-resnet")
        image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8))
        pixels = processor(images=image, return_tensors="pt").pixel_values
        assert torch.equal(pixels, ref["pixels"]), (pixels.shape, ref["pixels"].shape)
        result = {"model": type(model).__name__, "processor_mean": list(processor.image_mean)}
        if os.environ["HF_HUB_OFFLINE"] == "0":
            from huggingface_hub import HfApi
            info = HfApi().model_info("tester/tiny-resnet")
            result.update(library=info.library_name, card_library=info.card_data.library_name, sha=info.sha)
        print(json.dumps(result))
        """
    load_home = tmp_path / "home_load"  # empty cache: everything must come from the server
    online = last_json_line(run_python(load, hub_env(hub, load_home, TEST_DIR=str(tmp_path))).stdout)
    assert online == {
        "model": "ResNetForImageClassification",
        "processor_mean": [0.1, 0.2, 0.3],
        "library": "transformers",
        "card_library": "transformers",
        "sha": pushed["processor_commit"],
    }

    # Offline from the cache just filled: no request may reach the server.
    n_requests = len(hub.requests)
    offline_env = hub_env(hub, load_home, offline=True, TEST_DIR=str(tmp_path))
    offline = last_json_line(run_python(load, offline_env).stdout)
    assert offline == {"model": "ResNetForImageClassification", "processor_mean": [0.1, 0.2, 0.3]}
    assert hub.requests[n_requests:] == []


def test_card_data_front_matter() -> None:
    readme = "---\nlibrary_name: transformers\ntags:\n- vision\n- 'resnet'\nlicense: apache-2.0\nmodel-index:\n- name: x\n  results: []\n---\n# Card\n"
    assert parse_card_data(readme) == {
        "library_name": "transformers",
        "tags": ["vision", "resnet"],
        "license": "apache-2.0",
    }
    assert parse_card_data("# no front matter\n") is None
