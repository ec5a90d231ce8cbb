"""`comfys3 workflows` and `comfys3 validate`: usable with no S3 at all, readable errors only."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processor.settings import load_s3_settings
from tests.paths import MANIFESTS
from tests.processor.test_settings import S3_REQUIRED
from triggers.cli import main as cli
from triggers.cli import offline as offline_commands

DATA = MANIFESTS
COMFYS3 = Path(sys.executable).parent / "comfys3"
SHIPPED = ("img2img", "scale", "solid", "txt2img")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COMFYS3_"):
            monkeypatch.delenv(name)


def run_clean(
    *args: str, cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed command with an environment holding nothing but PATH: no S3, no AWS."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {})}
    return subprocess.run(
        [str(COMFYS3), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


# --- as a user runs it (subprocess, clean environment) ----------------------------------------


def test_validate_seed_example_with_no_s3_variables(tmp_path: Path) -> None:
    manifest = tmp_path / "job.json"
    manifest.write_text('{"workflow": "txt2img", "payload": {"seed": 123}}')
    result = run_clean("validate", "--print-graph", str(manifest), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    first, graph_text = result.stdout.split("\n", 1)
    assert first == f"{manifest}: ok (1 job: job)"
    graph = json.loads(graph_text)
    assert graph["3"]["inputs"]["seed"] == 123
    assert graph["3"]["class_type"] == "KSampler"
    assert graph["9"]["inputs"]["filename_prefix"] == "comfys3/job/9"


def test_workflows_with_no_s3_variables(tmp_path: Path) -> None:
    result = run_clean("workflows", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in SHIPPED:
        assert f"\n{name}: " in f"\n{result.stdout}"


def test_bad_setting_exits_2_without_traceback(tmp_path: Path) -> None:
    result = run_clean(
        "validate",
        str(DATA / "valid" / "txt2img-seed.json"),
        cwd=tmp_path,
        extra_env={"COMFYS3_MAX_MANIFEST_BYTES": "lots"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("comfys3: worker settings: COMFYS3_MAX_MANIFEST_BYTES")


# --- main() in process -----------------------------------------------------------------------


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_s3_variables_exit_2_naming_all(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No S3 command exists yet; a stand-in handler loads S3 settings the way one will."""

    def needs_s3(args: argparse.Namespace) -> int:
        load_s3_settings()
        return 0

    def register(subparsers: argparse._SubParsersAction) -> None:
        subparsers.add_parser("needs-s3").set_defaults(handler=needs_s3)

    monkeypatch.setattr(cli, "_registrations", lambda: [offline_commands.register, register])
    code, out, err = run_main(["needs-s3"], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("comfys3: S3 settings: missing environment variable(s): ")
    for name in S3_REQUIRED:
        assert name in err
    assert "Traceback" not in err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "workflows" in out
    assert "validate" in out
    assert "COMFYS3_" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("comfys3 ")
    assert out != "comfys3 "


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main([], capsys)
    assert code == 2
    assert "usage: comfys3" in out


@pytest.mark.parametrize("sub", ["workflows", "validate"])
def test_subcommand_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main([sub, "--help"])
    assert caught.value.code == 0
    assert f"usage: comfys3 {sub}" in capsys.readouterr().out


def test_workflows_lists_every_template_with_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["workflows"], capsys)
    assert code == 0, err
    for name in SHIPPED:
        assert f"{name}: " in out
    lines = out.splitlines()
    assert any(line.split()[:1] == ["seed"] and "(auto)" in line for line in lines)
    assert any(line.split()[:2] == ["image", "string"] and "required" in line for line in lines)
    assert any(line.split()[:1] == ["width"] and "x8" in line for line in lines)


def test_workflows_one_template(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["workflows", "scale"], capsys)
    assert code == 0
    assert out.startswith("scale: ")
    assert "txt2img" not in out
    assert "scale_by" in out


def test_workflows_schema_is_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["workflows", "txt2img", "--schema"], capsys)
    assert code == 0
    schema = json.loads(out)
    assert schema["type"] == "object"
    for field in ("seed", "steps", "cfg_scale", "sampler_name", "prompt", "width"):
        assert field in schema["properties"]
    assert schema["properties"]["steps"]["maximum"] == 150


def test_workflows_schema_without_a_name_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["workflows", "--schema"], capsys)
    assert code == 2 and out == ""  # not the table, silently
    assert err.startswith("comfys3: --schema prints one template's schema: give its name")
    assert "comfys3 workflows txt2img --schema" in err and "solid" in err


@pytest.mark.parametrize(
    ("name", "hint"),
    [("nope", "(known: img2img, scale, solid, txt2img)"), ("txt2im", "did you mean 'txt2img'?")],
)
def test_workflows_unknown_name_exits_1(
    name: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["workflows", name], capsys)
    assert code == 1
    assert out == ""
    assert err.startswith(f"comfys3: unknown workflow '{name}'")
    assert hint in err


def test_validate_reports_every_problem_per_file(capsys: pytest.CaptureFixture[str]) -> None:
    good = DATA / "valid" / "batch.json"
    bad = DATA / "invalid" / "several-problems.json"
    code, out, _ = run_main(["validate", str(good), str(bad)], capsys)
    assert code == 1
    assert f"{good}: ok (3 jobs: cats-1, cats-2, cats-3)" in out
    assert f"{bad}: invalid" in out
    for line in (
        "  output.format: ",
        "  colour: unknown field",
        "  payload.steps: ",
        "  payload.width: ",
        "  payload.sed: unknown field; did you mean 'seed'?",
        "  payload.sampler_name: ",
    ):
        assert line in out


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("not-json.json", "not valid JSON: Expecting property name"),
        ("latin1.json", "manifest is not UTF-8 text"),
    ],
)
def test_validate_unreadable_manifests(
    name: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["validate", str(DATA / "invalid" / name)], capsys)
    assert code == 1
    assert fragment in out


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("/etc/hostname", "it starts with '/'"),
        ("../secret.png", "it has a '..' path segment"),
        ("ftp://example.com/cat.png", "it looks like a URL"),  # https:// is fetched; ftp is not
        ("s3://Not_A_Bucket/cat.png", "'Not_A_Bucket' is not a bucket name"),
    ],
)
def test_validate_refuses_input_files_the_worker_would_refuse(
    image: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps({"workflow": "scale", "payload": {"image": image}}))
    code, out, _ = run_main(["validate", str(manifest)], capsys)
    assert code == 1
    assert f"{manifest}: invalid" in out
    assert f"  payload.image: input file {image!r} cannot be read: {reason}" in out
    assert "a path under the current folder for exec" in out


def test_validate_accepts_a_relative_input_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps({"workflow": "scale", "payload": {"image": "in/cat.png"}}))
    assert run_main(["validate", str(manifest)], capsys)[0] == 0


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["validate", str(tmp_path / "absent.json")], capsys)
    assert code == 1
    assert "absent.json: cannot read: No such file or directory" in out


def test_validate_obeys_raw_and_size_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = str(DATA / "raw-graph.json")
    code, out, _ = run_main(["validate", raw], capsys)
    assert code == 1
    assert "COMFYS3_ALLOW_RAW_WORKFLOWS" in out
    monkeypatch.setenv("COMFYS3_ALLOW_RAW_WORKFLOWS", "true")
    code, out, _ = run_main(["validate", raw], capsys)
    assert code == 0
    assert "ok (1 job: raw-1)" in out
    monkeypatch.setenv("COMFYS3_MAX_MANIFEST_BYTES", "1024")
    big = str(DATA / "valid" / "txt2img-full.json")
    assert Path(big).stat().st_size < 1024
    assert run_main(["validate", big], capsys)[0] == 0


def test_validate_uses_templates_from_the_extra_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "dot.json").write_text(
        json.dumps({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}})
    )
    (folder / "dot.py").write_text(
        '"""One dot."""\n'
        "from processor.workflows import WorkflowPayload\n"
        "class Payload(WorkflowPayload):\n"
        '    """One dot."""\n'
    )
    manifest = tmp_path / "d.json"
    manifest.write_text('{"workflow": "dot"}')
    assert run_main(["validate", str(manifest)], capsys)[0] == 1
    monkeypatch.setenv("COMFYS3_WORKFLOWS_DIR", str(folder))
    code, out, _ = run_main(["validate", str(manifest)], capsys)
    assert code == 0, out
    code, out, _ = run_main(["workflows"], capsys)
    assert "dot: One dot." in out


def test_broken_extra_folder_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMFYS3_WORKFLOWS_DIR", str(tmp_path / "missing"))
    code, out, err = run_main(["workflows"], capsys)
    assert code == 2
    assert out == ""
    assert "does not exist" in err
    assert "Traceback" not in err
