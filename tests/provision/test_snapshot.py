"""`comfys3 snapshot restore` against real git repositories, a local registry and real pip.

Everything stays on this machine: nodes are file:// repositories built here, the registry is a
server on 127.0.0.1, and pip runs with PIP_NO_INDEX so a requirement can only be satisfied by
what is installed already (or fail, which is the point of one of the nodes).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from provision import cli
from provision.manager import is_manager_name, is_manager_requirement
from provision.registry import RegistryClient
from provision.restore import GIT_MARKER, RestoreOptions, Restorer
from provision.snapshot import SnapshotError, load_snapshot, parse_snapshot, repo_name
from tests.paths import REPO


def said(capsys: pytest.CaptureFixture[str]) -> str:
    """All a command printed: its progress (stderr), then its summary (stdout)."""
    out, err = capsys.readouterr()
    return err + out


GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "PATH": "/usr/bin:/bin",
}


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], env=GIT_ENV, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def make_repo(root: Path, name: str, files: dict[str, str]) -> tuple[str, str]:
    """A repository with two commits; returns (first, second) commit hashes."""
    repo = root / name
    repo.mkdir(parents=True)
    git(repo, "init", "--quiet", "-b", "main")
    for path, text in files.items():
        (repo / path).write_text(text)
    (repo / "__init__.py").write_text("VERSION = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "one")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "__init__.py").write_text("VERSION = 2\n")
    git(repo, "commit", "--quiet", "-am", "two")
    return first, git(repo, "rev-parse", "HEAD")


@dataclass
class Repos:
    root: Path
    hashes: dict[str, tuple[str, str]]

    def url(self, name: str) -> str:
        return f"file://{self.root / name}"


INSTALL_PY = """\
from pathlib import Path
with Path("install.marker").open("a") as handle:
    handle.write("ran\\n")
"""


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Repos:
    root = tmp_path_factory.mktemp("remotes")
    specs = {
        "good-node": {"requirements.txt": "pip\n"},
        "bad-req-node": {"requirements.txt": "./no-such-package-dir\n"},
        "disabled-node": {},
        "script-node": {"install.py": INSTALL_PY},
        "ComfyUI-Manager": {},
    }
    hashes = {name: make_repo(root, name, files) for name, files in specs.items()}
    (root / "script-node.git").symlink_to(root / "script-node")  # a URL ending in .git
    return Repos(root, hashes)


class _Registry(BaseHTTPRequestHandler):
    packs: dict[tuple[str, str], bytes] = {}
    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        parsed = urlparse(self.path)
        parts = parsed.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "nodes" and parts[2] == "install":
            version = parse_qs(parsed.query).get("version", [""])[0]
            if (parts[1], version) not in self.packs:
                self._send(404, b'{"message": "not found"}')
                return
            host = f"http://127.0.0.1:{self.server.server_address[1]}"
            body = {"version": version, "downloadUrl": f"{host}/zips/{parts[1]}/{version}.zip"}
            self._send(200, json.dumps(body).encode())
        elif len(parts) == 3 and parts[0] == "zips":
            self._send(200, self.packs[(parts[1], parts[2].removesuffix(".zip"))])
        else:
            self._send(404, b"{}")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def registry() -> Iterator[str]:
    _Registry.packs = {
        ("comfy-pack", "1.2.0"): _zip({"__init__.py": "PACK = '1.2.0'\n", "install.py": INSTALL_PY})
    }
    _Registry.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def snapshot_file(folder: Path, repos: Repos, **overrides: object) -> Path:
    data: dict[str, object] = {
        "comfyui": "0" * 40,
        "git_custom_nodes": {
            repos.url("good-node"): {"hash": repos.hashes["good-node"][0], "disabled": False},
            repos.url("bad-req-node"): {"hash": repos.hashes["bad-req-node"][1], "disabled": False},
            repos.url("disabled-node"): {
                "hash": repos.hashes["disabled-node"][1],
                "disabled": True,
            },
            repos.url("script-node") + ".git": {
                "hash": repos.hashes["script-node"][1],
                "disabled": False,
            },
            repos.url("ComfyUI-Manager"): {"hash": repos.hashes["ComfyUI-Manager"][1]},
        },
        "cnr_custom_nodes": {"comfy-pack": "1.2.0"},
        "file_custom_nodes": [{"filename": "websocket_image_save.py", "disabled": False}],
        "pips": {"pip": ""},
    }
    data.update(overrides)
    path = folder / "2025-10-08_12-00-00_snapshot.json"
    path.write_text(json.dumps(data))
    return path


def comfyui_dir(tmp_path: Path) -> Path:
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes" / "ComfyUI-Manager").mkdir(parents=True)
    (comfyui / "custom_nodes" / "websocket_image_save.py").write_text("# core example\n")
    return comfyui


def run_restore(comfyui: Path, snapshot: Path, registry_url: str, *extra: str) -> int:
    argv = ["snapshot", "restore", str(snapshot), "--comfyui", str(comfyui)]
    argv += ["--python", sys.executable, "--registry-url", registry_url, *extra]
    return cli.main(argv)


def test_restore_installs_each_node_and_names_the_failure(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = comfyui_dir(tmp_path)
    nodes = comfyui / "custom_nodes"
    snapshot = snapshot_file(tmp_path, repos)

    code = run_restore(comfyui, snapshot, registry)
    _, err = capsys.readouterr()

    assert code == 1
    # Cloned at the pinned commit, not at the branch head.
    assert git(nodes / "good-node", "rev-parse", "HEAD") == repos.hashes["good-node"][0]
    assert (nodes / "good-node" / "__init__.py").read_text() == "VERSION = 1\n"
    assert (nodes / "good-node" / ".git" / GIT_MARKER).is_file()
    # install.py ran with the given Python, in the node's folder (".git" suffix dropped).
    assert (nodes / "script-node" / "install.marker").read_text() == "ran\n"
    # Disabled: not cloned, and said so.
    assert not (nodes / "disabled-node").exists()
    assert f"skipping {repos.url('disabled-node')} (disabled in the snapshot)" in err
    # The registry pack is unpacked at its version and its install.py ran.
    assert (nodes / "comfy-pack" / "__init__.py").read_text() == "PACK = '1.2.0'\n"
    assert (nodes / "comfy-pack" / "install.marker").read_text() == "ran\n"
    # The failed requirements are named at the end, and the node is not marked as done.
    assert "failed: bad-req-node" in err
    assert "bad-req-node: pip install -r requirements.txt failed" in err
    assert not (nodes / "bad-req-node" / ".git" / GIT_MARKER).exists()
    # ComfyUI-Manager is neither installed nor left behind.
    assert not (nodes / "ComfyUI-Manager").exists()
    # Progress lines a person can follow.
    assert f"[1/8] cloning {repos.url('good-node')} @ {repos.hashes['good-node'][0][:10]}" in err
    assert "[8/8] pip install of the snapshot's 1 requirement(s)" in err


def test_second_run_changes_nothing(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = comfyui_dir(tmp_path)
    nodes = comfyui / "custom_nodes"
    snapshot = snapshot_file(tmp_path, repos)
    run_restore(comfyui, snapshot, registry)
    capsys.readouterr()
    zips_before = [path for path in _Registry.requests if path.startswith("/zips/")]

    code = run_restore(comfyui, snapshot, registry)
    _, err = capsys.readouterr()

    assert code == 1  # the broken node is retried and still named, never taken as done
    assert "failed: bad-req-node" in err
    assert "good-node already at" in err
    assert "script-node already at" in err
    assert "comfy-pack already at 1.2.0" in err
    assert "cloning" not in err
    assert (nodes / "script-node" / "install.marker").read_text() == "ran\n"
    assert (nodes / "comfy-pack" / "install.marker").read_text() == "ran\n"
    assert [p for p in _Registry.requests if p.startswith("/zips/")] == zips_before


def test_clean_snapshot_exits_zero_twice_and_follows_a_new_pin(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = comfyui_dir(tmp_path)
    nodes = comfyui / "custom_nodes"
    first, second = repos.hashes["good-node"]
    pinned = {repos.url("good-node"): {"hash": first, "disabled": False}}
    snapshot = snapshot_file(tmp_path, repos, git_custom_nodes=pinned, cnr_custom_nodes={}, pips={})

    assert run_restore(comfyui, snapshot, registry) == 0
    capsys.readouterr()
    assert run_restore(comfyui, snapshot, registry) == 0
    second_run = said(capsys)
    assert "good-node already at" in second_run
    assert "0 installed, 2 already in place" in second_run  # the node and the file node

    # The snapshot moves the pin: the node is fetched and checked out at the new commit.
    pinned[repos.url("good-node")]["hash"] = second
    snapshot = snapshot_file(tmp_path, repos, git_custom_nodes=pinned, cnr_custom_nodes={}, pips={})
    assert run_restore(comfyui, snapshot, registry) == 0
    out_lines = said(capsys)
    assert f"updating good-node to {repos.url('good-node')} @ {second[:10]}" in out_lines
    assert git(nodes / "good-node", "rev-parse", "HEAD") == second
    assert (nodes / "good-node" / "__init__.py").read_text() == "VERSION = 2\n"


def test_keep_manager_installs_and_keeps_it(tmp_path: Path, repos: Repos, registry: str) -> None:
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    pinned = {repos.url("ComfyUI-Manager"): {"hash": repos.hashes["ComfyUI-Manager"][0]}}
    snapshot = snapshot_file(
        tmp_path,
        repos,
        git_custom_nodes=pinned,
        cnr_custom_nodes={},
        pips={},
        file_custom_nodes=[],
    )
    assert run_restore(comfyui, snapshot, registry, "--keep-manager") == 0
    manager = comfyui / "custom_nodes" / "ComfyUI-Manager"
    assert git(manager, "rev-parse", "HEAD") == repos.hashes["ComfyUI-Manager"][0]


def test_unknown_commit_and_registry_version_are_named(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    pinned = {repos.url("good-node"): {"hash": "f" * 40, "disabled": False}}
    snapshot = snapshot_file(
        tmp_path,
        repos,
        git_custom_nodes=pinned,
        cnr_custom_nodes={"comfy-pack": "9.9.9"},
        pips={},
        file_custom_nodes=["missing_node.py"],
    )
    assert run_restore(comfyui, snapshot, registry) == 1
    err = capsys.readouterr().err
    assert "failed: good-node, comfy-pack, missing_node.py" in err
    assert f"commit {'f' * 40} is not in good-node's repository" in err
    assert "HTTP 404" in err
    assert "single-file node" in err


def test_missing_git_repository_fails_without_prompting(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    url = f"file://{tmp_path / 'nowhere' / 'ghost-node'}"
    snapshot = snapshot_file(
        tmp_path,
        repos,
        git_custom_nodes={url: {"hash": "a" * 40}},
        cnr_custom_nodes={},
        pips={},
        file_custom_nodes=[],
    )
    assert run_restore(comfyui, snapshot, registry) == 1
    assert "failed: ghost-node" in capsys.readouterr().err
    assert not (comfyui / "custom_nodes" / "ghost-node").exists()


def test_failing_pips_are_named_one_by_one(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    snapshot = snapshot_file(
        tmp_path,
        repos,
        git_custom_nodes={},
        cnr_custom_nodes={},
        file_custom_nodes=[],
        pips={"pip": "", "no-such-dist-comfys3==1.0": "", "mine": "file:///home/me/mine"},
    )
    assert run_restore(comfyui, snapshot, registry) == 1
    _, err = capsys.readouterr()
    assert "failed: pip no-such-dist-comfys3==1.0" in err
    assert "pip pip" not in err
    assert "skipping pip requirement 'mine @ file:///home/me/mine'" in err


def test_unreadable_input_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x_snapshot.json"
    bad.write_text('{"git_custom_nodes": {"https://h/x": {"disabled": false}}}')
    assert cli.main(["snapshot", "restore", str(bad), "--comfyui", str(tmp_path)]) == 2
    assert "needs a 'hash' string" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["snapshot", "restore", "--snapshot-dir", str(empty), "--comfyui", "/"])
    assert code == 2
    assert "no *_snapshot.json" in capsys.readouterr().err


def test_parse_keeps_the_manager_format() -> None:
    snap = parse_snapshot(
        {
            "comfyui": "abc",
            "git_custom_nodes": {"https://github.com/a/b.git": {"hash": "1" * 40}},
            "cnr_custom_nodes": {"pack": "1.0.0"},
            "file_custom_nodes": [{"filename": "x.py", "disabled": True}],
            "pips": {"numpy==1.26.4": "", "torch": "https://download/torch.whl"},
        },
        Path("s.json"),
    )
    assert snap.git_nodes[0].name == "b"
    assert snap.registry_nodes[0].version == "1.0.0"
    assert snap.file_nodes[0].disabled
    assert snap.pips == ["numpy==1.26.4", "torch @ https://download/torch.whl"]
    assert repo_name("git@github.com:owner/Node-Pack.git") == "Node-Pack"
    with pytest.raises(SnapshotError, match="cnr_custom_nodes"):
        parse_snapshot({"cnr_custom_nodes": {"pack": 1}}, Path("s.json"))


def test_example_snapshot_in_the_repo_parses() -> None:
    examples = sorted(REPO.joinpath("snapshot").glob("*_snapshot.json"))
    assert examples, "snapshot/ holds an example *_snapshot.json"
    for path in examples:
        snap = load_snapshot(path)
        assert snap.comfyui and len(snap.comfyui) == 40
        assert all(len(node.commit) == 40 for node in snap.git_nodes)


def test_fetcher_is_injectable(tmp_path: Path) -> None:
    fetched: list[tuple[str, str]] = []

    class Stub:
        def fetch(self, node_id: str, version: str, target: Path) -> None:
            fetched.append((node_id, version))
            target.mkdir(parents=True)
            (target / "__init__.py").write_text("")

    snap = parse_snapshot({"cnr_custom_nodes": {"stubbed": "0.1.0"}}, Path("s.json"))
    out = io.StringIO()
    report = Restorer(RestoreOptions(comfyui=tmp_path), fetcher=Stub(), out=out).restore([snap])
    assert report.ok and fetched == [("stubbed", "0.1.0")]
    assert "[1/1] installing registry pack stubbed@0.1.0" in out.getvalue()
    assert isinstance(RegistryClient().base_url, str)


def test_a_comfyui_at_another_commit_is_reported(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = tmp_path / "ComfyUI"
    git(tmp_path, "clone", "--quiet", repos.url("good-node"), str(comfyui))
    first, second = repos.hashes["good-node"]
    snapshot = snapshot_file(
        tmp_path,
        repos,
        comfyui=first,
        git_custom_nodes={},
        cnr_custom_nodes={},
        pips={},
        file_custom_nodes=[],
    )
    assert run_restore(comfyui, snapshot, registry) == 0
    out = said(capsys)
    assert f"ComfyUI is at {second[:10]}, the snapshot was taken at {first[:10]}" in out
    assert git(comfyui, "rev-parse", "HEAD") == second

    assert run_restore(comfyui, snapshot, registry, "--checkout-comfyui") == 0
    assert git(comfyui, "rev-parse", "HEAD") == first


# --- both ComfyUI-Manager layouts ---------------------------------------------------------------


def packaged_comfyui(tmp_path: Path, manager_requirements: str = "pip\n") -> Path:
    """A ComfyUI tree as 0.36+ lays it out: manager_requirements.txt names the Manager's pip
    package (here a stand-in pip can satisfy offline), and an old clone is left behind."""
    comfyui = comfyui_dir(tmp_path)
    (comfyui / "manager_requirements.txt").write_text(manager_requirements)
    return comfyui


def test_packaged_manager_is_left_out_with_its_pip_and_old_clone(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = packaged_comfyui(tmp_path)
    snapshot = snapshot_file(
        tmp_path,
        repos,
        comfyui=None,  # a Manager 4.x "custom nodes only" snapshot
        git_custom_nodes={repos.url("good-node"): {"hash": repos.hashes["good-node"][1]}},
        cnr_custom_nodes={"comfyui-manager": "4.3"},
        pips={"comfyui_manager==4.3": "", "pip": ""},
    )
    assert run_restore(comfyui, snapshot, registry) == 0
    out = said(capsys)
    assert "ComfyUI-Manager here is the pip package of manager_requirements.txt" in out
    assert "found ComfyUI-Manager" in out  # the old clone, detected and then removed
    assert (
        "note: skipping pip requirement 'comfyui_manager==4.3' (ComfyUI-Manager is left out)" in out
    )
    assert "skipping comfyui-manager (ComfyUI-Manager is removed afterwards)" in out
    assert "[4/4] pip install of the snapshot's 1 requirement(s)" in out
    assert not (comfyui / "custom_nodes" / "ComfyUI-Manager").exists()
    assert not (comfyui / "custom_nodes" / "comfyui-manager").exists()
    nodes = comfyui / "custom_nodes"
    assert git(nodes / "good-node", "rev-parse", "HEAD") == repos.hashes["good-node"][1]
    assert "manager_requirements" not in out.split("pip install of the snapshot's")[1]


def test_keep_manager_on_a_packaged_comfyui_installs_its_requirements_not_a_clone(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = packaged_comfyui(tmp_path)
    pinned = {repos.url("ComfyUI-Manager"): {"hash": repos.hashes["ComfyUI-Manager"][0]}}
    snapshot = snapshot_file(
        tmp_path, repos, git_custom_nodes=pinned, cnr_custom_nodes={}, pips={}, file_custom_nodes=[]
    )
    (comfyui / "custom_nodes" / "ComfyUI-Manager").rmdir()
    assert run_restore(comfyui, snapshot, registry, "--keep-manager") == 0
    out = said(capsys)
    assert (
        f"[1/2] skipping {repos.url('ComfyUI-Manager')} (this ComfyUI installs ComfyUI-Manager "
        "from manager_requirements.txt instead)" in out
    )
    assert "[2/2] pip install -r manager_requirements.txt (ComfyUI-Manager)" in out
    assert "started with --enable-manager" in out
    assert not (comfyui / "custom_nodes" / "ComfyUI-Manager").exists()

    (comfyui / "manager_requirements.txt").write_text("./no-such-manager-dir\n")
    assert run_restore(comfyui, snapshot, registry, "--keep-manager") == 1
    err = capsys.readouterr().err
    assert "failed: ComfyUI-Manager" in err
    assert "pip install -r manager_requirements.txt failed" in err


def test_a_git_era_comfyui_is_told_apart_and_keeps_cloning(
    tmp_path: Path, repos: Repos, registry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = comfyui_dir(tmp_path)  # no manager_requirements.txt: ComfyUI up to 0.3.x
    (comfyui / "custom_nodes" / "ComfyUI-Manager").rmdir()
    pinned = {repos.url("ComfyUI-Manager"): {"hash": repos.hashes["ComfyUI-Manager"][0]}}
    snapshot = snapshot_file(
        tmp_path,
        repos,
        git_custom_nodes=pinned,
        cnr_custom_nodes={},
        pips={"comfyui-manager==3.37": ""},
        file_custom_nodes=[],
    )
    assert run_restore(comfyui, snapshot, registry) == 0
    out = said(capsys)
    assert "ComfyUI-Manager here is a git clone in custom_nodes/" in out
    assert "note: skipping pip requirement 'comfyui-manager==3.37'" in out
    assert not (comfyui / "custom_nodes" / "ComfyUI-Manager").exists()

    code = run_restore(comfyui, snapshot, registry, "--keep-manager", "--skip-pips")
    assert code == 0
    manager = comfyui / "custom_nodes" / "ComfyUI-Manager"
    assert git(manager, "rev-parse", "HEAD") == repos.hashes["ComfyUI-Manager"][0]
    assert "found ComfyUI-Manager" not in said(capsys)  # none was there before


def test_manager_names_and_requirements_are_recognised() -> None:
    assert all(map(is_manager_name, ["ComfyUI-Manager", "comfyui-manager@4.3"]))
    assert not is_manager_name("ComfyUI-Manager-Extras")
    for req in [
        "comfyui-manager==4.3",
        "comfyui_manager",
        "ComfyUI.Manager>=4",
        "comfyui-manager @ https://x/y.whl",
    ]:
        assert is_manager_requirement(req), req
    assert not is_manager_requirement("comfyui-frontend-package==1.53.6")
