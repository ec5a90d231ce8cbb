"""ComfyUI-Manager snapshot files, read into plain values.

A snapshot is what ComfyUI-Manager writes under ``user/__manager/snapshots`` (older versions:
``custom_nodes/ComfyUI-Manager/snapshots``): the ComfyUI commit, every custom node as a git
checkout (URL -> commit + disabled flag) or a registry (cnr) pack (id -> version), loose ``.py``
node files, and a ``pip freeze`` of the environment (``{"numpy==1.26.4": ""}``, or
``{"name": "url"}`` for ``name @ url`` lines). Parsing it here, strictly, means a malformed file
is refused before anything is cloned, with a message that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SnapshotError(Exception):
    """A snapshot file that cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class GitNode:
    url: str
    commit: str
    disabled: bool = False

    @property
    def name(self) -> str:
        """Folder under custom_nodes: the repository name, as ComfyUI-Manager names it."""
        return repo_name(self.url)


@dataclass(frozen=True)
class RegistryNode:
    node_id: str
    version: str


@dataclass(frozen=True)
class FileNode:
    filename: str
    disabled: bool = False


@dataclass(frozen=True)
class Snapshot:
    path: Path
    comfyui: str | None
    git_nodes: list[GitNode] = field(default_factory=list)
    registry_nodes: list[RegistryNode] = field(default_factory=list)
    file_nodes: list[FileNode] = field(default_factory=list)
    pips: list[str] = field(default_factory=list)


def repo_name(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    tail = tail.rsplit(":", 1)[-1]  # git@host:repo.git
    return tail.removesuffix(".git")


def _requirement(name: str, url: Any) -> str:
    """``{"numpy==1.26": ""}`` -> ``numpy==1.26``; ``{"pkg": "https://..."}`` -> ``pkg @ url``."""
    if url in ("", None):
        return name
    return f"{name} @ {url}"


def parse_snapshot(data: Any, path: Path) -> Snapshot:
    where = str(path)
    if not isinstance(data, dict):
        raise SnapshotError(f"{where}: expected a JSON object at the top level")

    comfyui = data.get("comfyui")
    if comfyui is not None and not isinstance(comfyui, str):
        raise SnapshotError(f"{where}: 'comfyui' must be a commit hash string")

    git_raw = data.get("git_custom_nodes") or {}
    if not isinstance(git_raw, dict):
        raise SnapshotError(f"{where}: 'git_custom_nodes' must map a URL to {{hash, disabled}}")
    git_nodes = []
    for url, info in git_raw.items():
        if not isinstance(info, dict) or not isinstance(info.get("hash"), str) or not info["hash"]:
            raise SnapshotError(f"{where}: git_custom_nodes[{url!r}] needs a 'hash' string")
        git_nodes.append(GitNode(url=url, commit=info["hash"], disabled=bool(info.get("disabled"))))

    cnr_raw = data.get("cnr_custom_nodes") or {}
    if not isinstance(cnr_raw, dict):
        raise SnapshotError(f"{where}: 'cnr_custom_nodes' must map a node id to a version")
    registry_nodes = []
    for node_id, version in cnr_raw.items():
        if not isinstance(version, str) or not version:
            raise SnapshotError(f"{where}: cnr_custom_nodes[{node_id!r}] needs a version string")
        registry_nodes.append(RegistryNode(node_id=node_id, version=version))

    files_raw = data.get("file_custom_nodes") or []
    if not isinstance(files_raw, list):
        raise SnapshotError(f"{where}: 'file_custom_nodes' must be a list")
    file_nodes = []
    for item in files_raw:
        if isinstance(item, str):
            file_nodes.append(FileNode(filename=item))
        elif isinstance(item, dict) and isinstance(item.get("filename"), str):
            file_nodes.append(
                FileNode(filename=item["filename"], disabled=bool(item.get("disabled")))
            )
        else:
            raise SnapshotError(f"{where}: file_custom_nodes entries need a 'filename'")

    pips_raw = data.get("pips") or {}
    if isinstance(pips_raw, dict):
        pips = [_requirement(str(name), url) for name, url in pips_raw.items()]
    elif isinstance(pips_raw, list):
        pips = [str(item) for item in pips_raw]
    else:
        raise SnapshotError(f"{where}: 'pips' must map a requirement to '' (or a URL)")

    return Snapshot(
        path=path,
        comfyui=comfyui or None,
        git_nodes=git_nodes,
        registry_nodes=registry_nodes,
        file_nodes=file_nodes,
        pips=pips,
    )


def load_snapshot(path: Path) -> Snapshot:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SnapshotError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnapshotError(f"{path}: not valid JSON: {error}") from None
    return parse_snapshot(data, path)


def default_snapshots(folder: Path) -> list[Path]:
    """Every ``*_snapshot.json`` in ``folder``, oldest name first (names start with a date)."""
    return sorted(folder.glob("*_snapshot.json"))
