"""The README's "Try it in one minute", run as a newcomer runs it: the commands read from
README.md, one by one, in a copy of this checkout, in a fresh venv that has only what
``pip install -e .`` puts there, against the fake ComfyUI as a process of its own.

The one change to the commands is ComfyUI's address, which the README asks the reader to give
(``http://127.0.0.1:8188``): here it is the fake's, on a free port. Each ``ls`` must list what its
comment promises. This is slow (most of it is pip resolving the dependencies, from pip's own
cache), so it is the only test that builds a venv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.workers import ROOT, fake_comfy_process

README_URL = "http://127.0.0.1:8188"


def quickstart_commands() -> list[tuple[str, str]]:
    """(command, its comment) for every line of the bash blocks of the quickstart section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it in one minute", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.splitlines():
            command, _, comment = line.partition("  #")
            if command.strip():
                commands.append((command.strip(), comment.strip()))
    return commands


def copy_of_checkout(target: Path) -> Path:
    """The files a clone would have (tracked, and new ones not ignored), nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def fresh_venv(path: Path) -> dict[str, str]:
    """A new, empty venv, and the environment of a shell that activated it.

    ``pip`` in it is this pip, run with ``--python`` so it installs into the new venv: the venv
    gets exactly what the README's ``pip install`` installs, without a second copy of pip being
    unpacked first.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    shim = path / "bin" / "pip"
    shim.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m pip --python "{path / "bin" / "python"}" "$@"\n'
    )
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYS3_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    outer_bin = str(Path(sys.executable).parent)
    system_path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p != outer_bin]
    env.update(
        {
            "VIRTUAL_ENV": str(path),
            "PATH": ":".join([str(path / "bin"), *system_path]),
            "PIP_NO_COMPILE": "1",  # speed only: imports compile what they need
            "COLUMNS": "100",
        }
    )
    return env


def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    commands = quickstart_commands()
    assert commands[0][0] == "pip install -e ."  # the first thing a newcomer runs
    assert sum(command.startswith("comfys3 exec") for command, _ in commands) == 2
    checkout = copy_of_checkout(tmp_path / "comfys3")
    env = fresh_venv(tmp_path / "venv")

    with fake_comfy_process(tmp_path / "comfyui") as fake:
        for command, comment in commands:
            line = command.replace(README_URL, fake.url)
            result = subprocess.run(
                ["bash", "-c", line], cwd=checkout, env=env,
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            shown = f"$ {line}\n{result.stdout}\n{result.stderr}"
            assert result.returncode == 0, shown
            assert "Traceback" not in result.stderr, shown
            if command.startswith("ls "):
                assert sorted(result.stdout.split()) == sorted(comment.split()), shown
            if command.startswith("comfys3 exec"):
                assert ": succeeded -> " in result.stdout, shown
            if command.startswith("comfys3 validate"):
                assert result.stderr.startswith("job.json: ok (1 job: job)"), shown
                assert json.loads(result.stdout)["3"]["class_type"] == "SaveImage", shown
        ran = fake.stats()["executed"]

    assert len(ran) == 2  # one prompt per exec, both on the fake ComfyUI
    # Nothing came from this test's own environment: the venv's comfys3 is the checkout copy's.
    where = subprocess.run(
        ["python", "-c", "import triggers, moto"], cwd=tmp_path, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert "No module named 'moto'" in where.stderr  # test extras were not installed
