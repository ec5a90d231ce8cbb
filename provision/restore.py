"""Bring a ComfyUI install to the custom nodes a ComfyUI-Manager snapshot describes.

Run at image build, so its two duties are: never let a broken node slip into an image that then
fails at the first job (every failure is collected and named, and the exit code says so), and
cost nothing the second time (a node already at its commit, with its dependencies installed, is
left alone; a marker in the node's ``.git`` records that the install finished, so a node whose
requirements failed last time is retried instead of being taken as done).

ComfyUI-Manager is left out unless asked for, in whichever layout the install has (see
provision.manager): a git clone in custom_nodes/ (ComfyUI up to 0.3.x) is removed, and the pip
package of today's ComfyUI is neither installed from the snapshot's pips nor needed, since
ComfyUI loads it only with --enable-manager. With keep_manager a packaged install gets
``manager_requirements.txt`` instead of a clone.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from provision.commands import CommandResult, Runner, run_command
from provision.manager import (
    MANAGER_REQUIREMENTS,
    ManagerLayout,
    detect,
    is_manager_name,
    is_manager_requirement,
)
from provision.registry import PackFetcher, RegistryClient, RegistryError
from provision.snapshot import FileNode, GitNode, RegistryNode, Snapshot

GIT_MARKER = "comfys3-installed"  # inside <node>/.git: the commit whose install completed
PACK_MARKER = ".comfys3-pack"  # inside a registry pack: the version whose install completed


class StepFailed(Exception):
    """One node could not be restored; str() says why, for the closing summary."""


@dataclass
class RestoreOptions:
    comfyui: Path
    python: str = sys.executable
    keep_manager: bool = False
    install_pips: bool = True
    pip_args: list[str] = field(default_factory=list)
    checkout_comfyui: bool = False

    @property
    def custom_nodes(self) -> Path:
        return self.comfyui / "custom_nodes"


@dataclass
class RestoreReport:
    installed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = (
            f"{len(self.installed)} installed, {len(self.unchanged)} already in place, "
            f"{len(self.skipped)} skipped, {len(self.failures)} failed"
        )
        if not self.failures:
            return f"snapshot restore: {head}"
        names = ", ".join(name for name, _ in self.failures)
        lines = [f"snapshot restore FAILED: {head}", f"failed: {names}"]
        lines += [f"  - {name}: {reason}" for name, reason in self.failures]
        return "\n".join(lines)


def is_manager(name: str) -> bool:
    return is_manager_name(name)


def merge(snapshots: Sequence[Snapshot]) -> Snapshot:
    """Several snapshots as one; a later file wins for the same URL, pack id or file name."""
    git: dict[str, GitNode] = {}
    packs: dict[str, RegistryNode] = {}
    files: dict[str, FileNode] = {}
    pips: dict[str, None] = {}
    comfyui = None
    for snap in snapshots:
        comfyui = snap.comfyui or comfyui
        git.update({node.url.rstrip("/").removesuffix(".git"): node for node in snap.git_nodes})
        packs.update({node.node_id: node for node in snap.registry_nodes})
        files.update({node.filename: node for node in snap.file_nodes})
        pips.update(dict.fromkeys(snap.pips))
    return Snapshot(
        path=snapshots[-1].path if snapshots else Path("."),
        comfyui=comfyui,
        git_nodes=list(git.values()),
        registry_nodes=list(packs.values()),
        file_nodes=list(files.values()),
        pips=list(pips),
    )


class Restorer:
    def __init__(
        self,
        options: RestoreOptions,
        *,
        fetcher: PackFetcher | None = None,
        runner: Runner = run_command,
        out: TextIO | None = None,
    ) -> None:
        self.options = options
        self.fetcher: PackFetcher = fetcher or RegistryClient()
        self.runner = runner
        self.out = out or sys.stderr  # progress is a message; the summary is the data
        self.report = RestoreReport()
        self._step = 0
        self._steps = 0
        self.layout = ManagerLayout(packaged=False, clones=())

    # -- output ---------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    def _progress(self, message: str) -> None:
        self._step += 1
        self._say(f"[{self._step}/{self._steps}] {message}")

    # -- commands -------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], cwd: Path | None = None) -> CommandResult:
        return self.runner(argv, cwd)

    def _must(self, argv: Sequence[str], what: str, cwd: Path | None = None) -> CommandResult:
        result = self._run(argv, cwd)
        if not result.ok:
            raise StepFailed(f"{what} failed (exit {result.returncode})\n{result.tail()}")
        return result

    def _git(self, repo: Path, *args: str) -> CommandResult:
        return self._run(["git", "-C", str(repo), *args])

    def _head(self, repo: Path) -> str | None:
        result = self._git(repo, "rev-parse", "HEAD")
        return result.output.strip() if result.ok else None

    def _resolve(self, repo: Path, commit: str) -> str | None:
        result = self._git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        return result.output.strip() if result.ok else None

    def _pip_install(self, args: Sequence[str], what: str, cwd: Path | None = None) -> None:
        argv = [self.options.python, "-m", "pip", "install", *self.options.pip_args, *args]
        self._must(argv, what, cwd)

    # -- the plan -------------------------------------------------------------------------

    def restore(self, snapshots: Sequence[Snapshot]) -> RestoreReport:
        snap = merge(snapshots)
        self.options.custom_nodes.mkdir(parents=True, exist_ok=True)
        self.layout = detect(self.options.comfyui)
        self._say(self.layout.describe())
        pips = [req for req in snap.pips if self._wanted_pip(req)] if snap.pips else []
        packaged_manager = self.options.keep_manager and self.layout.packaged
        self._steps = (
            len(snap.git_nodes)
            + len(snap.registry_nodes)
            + len(snap.file_nodes)
            + (1 if pips and self.options.install_pips else 0)
            + (1 if packaged_manager else 0)
        )
        self._check_comfyui(snap.comfyui)
        for git_node in snap.git_nodes:
            self._guard(git_node.name, self._git_node, git_node)
        for pack in snap.registry_nodes:
            self._guard(pack.node_id, self._registry_node, pack)
        for file_node in snap.file_nodes:
            self._guard(file_node.filename, self._file_node, file_node)
        self._pips(snap.pips)
        if packaged_manager:
            self._guard("ComfyUI-Manager", self._packaged_manager, None)
        if not self.options.keep_manager:
            self._remove_manager()
        return self.report

    def _guard(self, name: str, step: Callable[[Any], None], node: object) -> None:
        try:
            step(node)
        except StepFailed as error:
            self.report.failures.append((name, str(error)))
            self._say(f"    FAILED {name}: {str(error).splitlines()[0]}")

    # -- ComfyUI itself -------------------------------------------------------------------

    def _check_comfyui(self, commit: str | None) -> None:
        comfyui = self.options.comfyui
        if not commit or not (comfyui / ".git").exists():
            return
        head = self._head(comfyui)
        if head is None or head.startswith(commit) or commit.startswith(head):
            return
        if not self.options.checkout_comfyui:
            self._say(
                f"note: ComfyUI is at {head[:10]}, the snapshot was taken at {commit[:10]}; "
                "pass --checkout-comfyui to move it"
            )
            return
        try:
            self._say(f"checking out ComfyUI @ {commit[:10]}")
            self._checkout(comfyui, commit, "ComfyUI")
            if (comfyui / "requirements.txt").is_file():
                self._pip_install(
                    ["-r", "requirements.txt"], "ComfyUI requirements.txt", cwd=comfyui
                )
        except StepFailed as error:
            self.report.failures.append(("ComfyUI", str(error)))
            self._say(f"    FAILED ComfyUI: {str(error).splitlines()[0]}")

    # -- git nodes ------------------------------------------------------------------------

    def _checkout(self, repo: Path, commit: str, name: str) -> None:
        if self._resolve(repo, commit) is None:
            self._git(repo, "fetch", "--quiet", "--tags", "origin")
        if self._resolve(repo, commit) is None:
            # Servers that allow it hand out a commit no branch points at any more.
            self._git(repo, "fetch", "--quiet", "origin", commit)
        if self._resolve(repo, commit) is None:
            raise StepFailed(f"commit {commit} is not in {name}'s repository")
        self._must(
            ["git", "-C", str(repo), "checkout", "--quiet", "--force", "--detach", commit],
            f"git checkout {commit[:10]}",
        )
        if (repo / ".gitmodules").is_file():
            self._must(
                ["git", "-C", str(repo), "submodule", "update", "--init", "--recursive"],
                "git submodule update",
            )

    def _git_node(self, node: GitNode) -> None:
        short = node.commit[:10]
        if node.disabled:
            self._progress(f"skipping {node.url} (disabled in the snapshot)")
            self.report.skipped.append(node.name)
            return
        if is_manager(node.name) and not self.options.keep_manager:
            self._progress(f"skipping {node.url} (ComfyUI-Manager is removed after the restore)")
            self.report.skipped.append(node.name)
            return
        if is_manager(node.name) and self.layout.packaged:
            self._progress(
                f"skipping {node.url} (this ComfyUI installs ComfyUI-Manager from "
                f"{MANAGER_REQUIREMENTS} instead)"
            )
            self.report.skipped.append(node.name)
            return
        target = self.options.custom_nodes / node.name
        if target.exists():
            if not (target / ".git").is_dir():
                raise StepFailed(f"{target} exists but is not a git checkout; remove it")
            head = self._head(target)
            wanted = self._resolve(target, node.commit)
            marker = target / ".git" / GIT_MARKER
            done = marker.read_text().strip() if marker.is_file() else None
            if head is not None and head == wanted and done == head:
                self._progress(f"{node.name} already at {short}")
                self.report.unchanged.append(node.name)
                return
            if head is not None and head == wanted:
                self._progress(f"{node.name} at {short}; finishing its install")
            else:
                self._progress(f"updating {node.name} to {node.url} @ {short}")
                self._checkout(target, node.commit, node.name)
        else:
            self._progress(f"cloning {node.url} @ {short}")
            clone = self._run(["git", "clone", "--quiet", node.url, str(target)])
            if not clone.ok:
                shutil.rmtree(target, ignore_errors=True)
                raise StepFailed(f"git clone {node.url} failed\n{clone.tail()}")
            self._checkout(target, node.commit, node.name)
        self._install_dependencies(target, node.name)
        head = self._head(target) or node.commit
        (target / ".git" / GIT_MARKER).write_text(head + "\n")
        self.report.installed.append(node.name)

    def _install_dependencies(self, folder: Path, name: str) -> None:
        """requirements.txt into the Python that runs ComfyUI, then install.py, as Manager does."""
        if (folder / "requirements.txt").is_file():
            self._say(f"    pip install -r {name}/requirements.txt")
            self._pip_install(
                ["-r", "requirements.txt"], "pip install -r requirements.txt", cwd=folder
            )
        if (folder / "install.py").is_file():
            self._say(f"    running {name}/install.py")
            self._must([self.options.python, "install.py"], "install.py", cwd=folder)

    # -- registry packs -------------------------------------------------------------------

    def _registry_node(self, pack: RegistryNode) -> None:
        if is_manager(pack.node_id) and (not self.options.keep_manager or self.layout.packaged):
            why = (
                f"this ComfyUI installs it from {MANAGER_REQUIREMENTS}"
                if self.options.keep_manager
                else "ComfyUI-Manager is removed afterwards"
            )
            self._progress(f"skipping {pack.node_id} ({why})")
            self.report.skipped.append(pack.node_id)
            return
        target = self.options.custom_nodes / pack.node_id
        marker = target / PACK_MARKER
        if marker.is_file() and marker.read_text().strip() == pack.version:
            self._progress(f"{pack.node_id} already at {pack.version}")
            self.report.unchanged.append(pack.node_id)
            return
        self._progress(f"installing registry pack {pack.node_id}@{pack.version}")
        try:
            self.fetcher.fetch(pack.node_id, pack.version, target)
        except RegistryError as error:
            raise StepFailed(str(error)) from None
        self._install_dependencies(target, pack.node_id)
        marker.write_text(pack.version + "\n")
        self.report.installed.append(pack.node_id)

    # -- loose files and pips -------------------------------------------------------------

    def _file_node(self, node: FileNode) -> None:
        if node.disabled:
            self._progress(f"skipping {node.filename} (disabled in the snapshot)")
            self.report.skipped.append(node.filename)
            return
        self._progress(f"checking file node {node.filename}")
        if (self.options.custom_nodes / node.filename).is_file():
            self.report.unchanged.append(node.filename)
            return
        raise StepFailed(
            f"{node.filename} is a single-file node; a snapshot does not carry its source, "
            f"so copy it into custom_nodes/ (or drop it from the snapshot)"
        )

    def _wanted_pip(self, requirement: str) -> bool:
        """Installable here: not a path on the snapshot's machine, not the Manager unless kept."""
        if self._local_pip(requirement):
            return False
        return self.options.keep_manager or not is_manager_requirement(requirement)

    @staticmethod
    def _local_pip(requirement: str) -> bool:
        """``pkg @ file:///home/me/...`` names the snapshotting machine's disk: not installable."""
        _, _, url = requirement.partition(" @ ")
        return url.strip().startswith("file:")

    def _pips(self, requirements: list[str]) -> None:
        local = [req for req in requirements if self._local_pip(req)]
        for req in local:
            self._say(f"note: skipping pip requirement {req!r} (a path on the snapshot's machine)")
            self.report.skipped.append(req)
        for req in requirements:
            if req not in local and not self._wanted_pip(req):
                self._say(f"note: skipping pip requirement {req!r} (ComfyUI-Manager is left out)")
                self.report.skipped.append(req)
        wanted = [req for req in requirements if self._wanted_pip(req)]
        if not wanted:
            return
        if not self.options.install_pips:
            self._say(f"note: not installing the snapshot's {len(wanted)} pip requirement(s)")
            return
        self._progress(f"pip install of the snapshot's {len(wanted)} requirement(s)")
        try:
            self._pip_install(wanted, "pip install")
            self.report.installed.append("pips")
            return
        except StepFailed as error:
            if len(wanted) == 1:
                self.report.failures.append((f"pip {wanted[0]}", str(error)))
                self._say(f"    FAILED pip {wanted[0]}")
                return
        # Once more one by one, so the summary names the requirements that cannot install.
        for req in wanted:
            try:
                self._pip_install([req], f"pip install {req}")
            except StepFailed as error:
                self.report.failures.append((f"pip {req}", str(error)))
                self._say(f"    FAILED pip {req}")

    # -- ComfyUI-Manager ------------------------------------------------------------------

    def _packaged_manager(self, _: object) -> None:
        """Today's ComfyUI: the Manager is the pip package its manager_requirements.txt pins."""
        self._progress(f"pip install -r {MANAGER_REQUIREMENTS} (ComfyUI-Manager)")
        self._pip_install(
            ["-r", MANAGER_REQUIREMENTS], f"pip install -r {MANAGER_REQUIREMENTS}",
            cwd=self.options.comfyui,
        )  # fmt: skip
        self.report.installed.append("ComfyUI-Manager")
        self._say("note: ComfyUI loads ComfyUI-Manager only when started with --enable-manager")

    def _remove_manager(self) -> None:
        """The Manager scans registries at every boot; a batch worker never uses it."""
        custom_nodes = self.options.custom_nodes
        for entry in sorted(custom_nodes.iterdir()):
            if entry.is_dir() and is_manager(entry.name):
                shutil.rmtree(entry)
                self._say(f"removed {entry} (pass --keep-manager to keep it)")
