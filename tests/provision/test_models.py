"""`comfys3 models download` against a local stand-in for the Hugging Face Hub.

hf_hub_download asks ``HEAD {endpoint}/{repo_id}/resolve/{revision}/{filename}`` for the file's
metadata (X-Repo-Commit, ETag or X-Linked-Etag, Content-Length / X-Linked-Size; a 404 carries
X-Error-Code: EntryNotFound), then GETs the same URL for the bytes. The server below answers
exactly those, on 127.0.0.1, and counts what it was asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from provision import cli
from provision.models import ModelsError, parse_models
from tests.paths import REPO


def said(capsys: pytest.CaptureFixture[str]) -> str:
    """All a command printed: its progress (stderr), then its summary (stdout)."""
    out, err = capsys.readouterr()
    return err + out


COMMIT = "a" * 40
FILES = {
    ("comfy/tiny", "tiny.safetensors"): b"tiny model bytes " * 1000,
    ("comfy/tiny", "sub/vae.pt"): b"vae bytes",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Hub(BaseHTTPRequestHandler):
    counts: Counter[str] = Counter()

    def log_message(self, *args: object) -> None:
        pass

    def _lookup(self) -> bytes | None:
        path = unquote(self.path.split("?", 1)[0]).strip("/")
        owner, name, verb, _revision, filename = path.split("/", 4)
        assert verb == "resolve"
        return FILES.get((f"{owner}/{name}", filename))

    def _headers(self, body: bytes | None) -> None:
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha(body)}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_HEAD(self) -> None:
        self.counts["HEAD"] += 1
        self._headers(self._lookup())

    def do_GET(self) -> None:
        self.counts["GET"] += 1
        body = self._lookup()
        self._headers(body)
        if body is not None:
            self.wfile.write(body)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Counter[str]]:
    _Hub.counts = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cache from the machine
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield _Hub.counts
    server.shutdown()
    server.server_close()


def write_models(folder: Path, entries: list[dict[str, str]]) -> Path:
    path = folder / "models.json"
    path.write_text(json.dumps(entries))
    return path


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def download(models: Path, dest: Path) -> int:
    return cli.main(["models", "download", str(models), "--dest", str(dest)])


def test_download_lands_in_its_folder_and_a_second_run_downloads_nothing(
    tmp_path: Path, hub: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = FILES[("comfy/tiny", "tiny.safetensors")]
    models = write_models(
        tmp_path,
        [
            {
                "repo_id": "comfy/tiny",
                "filename": "tiny.safetensors",
                "folder": "checkpoints",
                "sha256": sha(tiny),
            },
            {"repo_id": "comfy/tiny", "filename": "sub/vae.pt", "folder": "vae", "name": "v.pt"},
        ],
    )
    dest = tmp_path / "comfy-models"

    assert download(models, dest) == 0
    assert (dest / "checkpoints" / "tiny.safetensors").read_bytes() == tiny
    assert (dest / "vae" / "v.pt").read_bytes() == b"vae bytes"
    out, err = capsys.readouterr()  # progress on stderr, the summary (the data) on stdout
    assert (
        "[1/2] downloading checkpoints/tiny.safetensors from comfy/tiny/tiny.safetensors@main"
        in err
    )
    assert out.strip() and "downloading" not in out
    assert hub["GET"] == 2
    # Nothing but the two models and the record of what was verified.
    assert files_under(dest) == [".comfys3-models.json", "checkpoints/tiny.safetensors", "vae/v.pt"]

    before = dict(hub)
    assert download(models, dest) == 0
    assert dict(hub) == before  # not a single request
    out = said(capsys)
    assert "[2/2] vae/v.pt already present and verified" in out
    assert "0 downloaded, 2 already present" in out


def test_a_changed_file_in_place_is_replaced(tmp_path: Path, hub: Counter[str]) -> None:
    tiny = FILES[("comfy/tiny", "tiny.safetensors")]
    models = write_models(
        tmp_path,
        [{"repo_id": "comfy/tiny", "filename": "tiny.safetensors", "folder": "checkpoints"}],
    )
    dest = tmp_path / "m"
    target = dest / "checkpoints" / "tiny.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"someone else's file")  # present, but never verified

    assert download(models, dest) == 0
    assert target.read_bytes() == tiny
    assert hub["GET"] == 1


def test_checksum_mismatch_fails_and_leaves_nothing(
    tmp_path: Path, hub: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    models = write_models(
        tmp_path,
        [
            {
                "repo_id": "comfy/tiny",
                "filename": "tiny.safetensors",
                "folder": "checkpoints",
                "sha256": "0" * 64,
            }
        ],
    )
    dest = tmp_path / "m"

    assert download(models, dest) == 1
    err = capsys.readouterr().err
    assert "sha256 mismatch for comfy/tiny/tiny.safetensors@main" in err
    assert f"expected {'0' * 64}" in err
    assert hub["GET"] == 1
    # No model, no partial download, no staging or hub cache left under dest.
    assert files_under(dest) == []
    assert not (dest / "checkpoints").exists()


def test_missing_file_gives_a_readable_error(
    tmp_path: Path, hub: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    models = write_models(
        tmp_path,
        [{"repo_id": "comfy/tiny", "filename": "nope.safetensors", "folder": "loras"}],
    )
    dest = tmp_path / "m"
    assert download(models, dest) == 1
    err = capsys.readouterr().err
    assert "loras/nope.safetensors: no file 'nope.safetensors' in comfy/tiny" in err
    assert "revision 'main'" in err
    assert "Traceback" not in err
    assert files_under(dest) == []


def test_bad_models_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = write_models(tmp_path, [{"repo_id": "x", "filename": "a", "folder": "b"}])
    assert download(models, tmp_path / "m") == 2
    assert "'repo_id' must look like 'owner/name'" in capsys.readouterr().err


def test_parse_rejects_escapes_and_duplicates() -> None:
    with pytest.raises(ModelsError, match=r"without '\.\.'"):
        parse_models([{"repo_id": "a/b", "filename": "f", "folder": "../etc"}], "m.json")
    with pytest.raises(ModelsError, match="same file"):
        parse_models(
            [
                {"repo_id": "a/b", "filename": "x/f.pt", "folder": "vae"},
                {"repo_id": "a/c", "filename": "f.pt", "folder": "vae"},
            ],
            "m.json",
        )
    with pytest.raises(ModelsError, match="unknown key"):
        parse_models([{"repo_id": "a/b", "filename": "f", "folder": "v", "sha": "x"}], "m")
    (spec,) = parse_models(
        {"models": [{"repo_id": "a/b", "filename": "d/f.pt", "folder": "vae", "sha256": "A" * 64}]},
        "m.json",
    )
    assert str(spec.relative_path) == "vae/f.pt"
    assert spec.revision == "main" and spec.sha256 == "a" * 64


def test_repo_models_file_is_valid() -> None:
    root = REPO
    specs = parse_models(json.loads((root / "models.json").read_text()), "models.json")
    assert all(spec.folder for spec in specs)
