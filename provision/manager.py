"""Which ComfyUI-Manager layout a ComfyUI install has, so a restore treats the Manager right.

Up to ComfyUI 0.3.x the Manager is a git clone in ``custom_nodes/`` (ComfyUI-Manager, loaded as
a custom node at every start, scanning registries). Since 0.36 ComfyUI ships
``manager_requirements.txt`` and the Manager is the pip package ``comfyui-manager`` (modules
``comfyui_manager`` and ``cm_cli``), loaded only when ComfyUI runs with ``--enable-manager``.
A snapshot taken on either may be restored onto either, so the restore asks the install, not
the snapshot, which layout applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MANAGER_REQUIREMENTS = "manager_requirements.txt"
CLONE_NAMES = {"comfyui-manager"}  # custom_nodes/ComfyUI-Manager, any case, maybe "@version"
PIP_NAMES = {"comfyui-manager"}  # normalised: comfyui_manager and ComfyUI-Manager too


@dataclass(frozen=True)
class ManagerLayout:
    packaged: bool  # ComfyUI installs the Manager with pip (manager_requirements.txt)
    clones: tuple[Path, ...]  # Manager clones found in custom_nodes/

    def describe(self) -> str:
        if self.packaged:
            where = f"the pip package of {MANAGER_REQUIREMENTS} (loaded with --enable-manager)"
        else:
            where = "a git clone in custom_nodes/"
        found = f"; found {', '.join(p.name for p in self.clones)}" if self.clones else ""
        return f"ComfyUI-Manager here is {where}{found}"


def is_manager_name(name: str) -> bool:
    """A custom_nodes folder or registry id of the Manager (``comfyui-manager@4.3`` too)."""
    return name.split("@", 1)[0].lower() in CLONE_NAMES


def is_manager_requirement(requirement: str) -> bool:
    """``comfyui-manager==4.3``, ``comfyui_manager @ https://...``: the Manager's pip package."""
    name = re.split(r"[\s<>=!~;@\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower() in PIP_NAMES


def detect(comfyui: Path) -> ManagerLayout:
    custom_nodes = comfyui / "custom_nodes"
    clones: tuple[Path, ...] = ()
    if custom_nodes.is_dir():
        clones = tuple(
            sorted(p for p in custom_nodes.iterdir() if p.is_dir() and is_manager_name(p.name))
        )
    return ManagerLayout(packaged=(comfyui / MANAGER_REQUIREMENTS).is_file(), clones=clones)
