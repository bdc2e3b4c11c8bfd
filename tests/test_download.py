"""scripts/download.py against a fake Hub on the loopback address: no network needed."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("huggingface_hub")

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"not really weights",
    "tokenizer.json": b"{}",
    "pytorch_model.bin": b"never downloaded",
    "README.md": b"never downloaded",
}
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """Answers the requests a snapshot download makes: repo info, file tree and file resolve."""

    repo_errors = {"org/gated": (401, "GatedRepo"), "org/missing": (404, "RepoNotFound")}

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        for repo, (status, code) in self.repo_errors.items():
            if repo in self.path:
                return self.reply(status, b"{}", {"X-Error-Code": code, "X-Error-Message": code})
        if self.path.startswith("/api/models/") and "/tree/" in self.path:
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for f, b in FILES.items()]
            return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if self.path.startswith("/api/models/"):
            info = {"id": "org/model", "sha": SHA, "siblings": [{"rfilename": f} for f in FILES]}
            return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        name = self.path.split(f"/resolve/{SHA}/")[-1]
        if "/resolve/" in self.path and name in FILES:
            body = FILES[name]
            etag = hashlib.sha1(body).hexdigest()
            return self.reply(200, body, {"X-Repo-Commit": SHA, "ETag": f'"{etag}"'})
        self.reply(404, b"{}", {"X-Error-Code": "EntryNotFound"})

    do_HEAD = do_GET


@pytest.fixture
def fake_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield endpoint
    server.shutdown()


def test_downloads_only_what_nanotune_reads(fake_hub, tmp_path):
    from scripts.download import download

    folder = download("org/model", out=tmp_path / "m")
    got = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert got == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "config.json").read_bytes() == FILES["config.json"]


@pytest.mark.parametrize("repo,message", [("org/gated", "is gated"), ("org/missing", "was not found")])
def test_gated_and_unknown_repos_explain_themselves(fake_hub, tmp_path, repo, message):
    from scripts.download import download

    with pytest.raises(SystemExit, match=message):
        download(repo, out=tmp_path / "m")


def test_no_network_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    from scripts.download import download

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(SystemExit, match="cannot reach the Hub") as err:
        download("org/model", out=tmp_path / "m")
    assert "\n" not in str(err.value)
