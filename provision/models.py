"""Model files from the Hugging Face Hub into ComfyUI's model folders, verified.

Each file is downloaded into a staging folder under the destination (same filesystem, so the
final move is a rename), its sha256 checked, and only then moved to ``<dest>/<folder>/<name>``:
a failed or mismatching download leaves nothing behind, and a file in place is always whole.
A small record (``.comfys3-models.json``) remembers what was verified, so a second run neither
downloads nor re-hashes multi-gigabyte files whose size and mtime did not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

RECORD_NAME = ".comfys3-models.json"
STAGING_NAME = ".comfys3-staging"
_HEX = set("0123456789abcdef")


class ModelsError(Exception):
    """A models file or a download that cannot work; the message says which entry and why."""


@dataclass(frozen=True)
class ModelSpec:
    repo_id: str
    filename: str
    folder: str
    revision: str = "main"
    sha256: str | None = None
    name: str | None = None

    @property
    def relative_path(self) -> PurePosixPath:
        return PurePosixPath(self.folder) / (self.name or PurePosixPath(self.filename).name)

    def describe(self) -> str:
        return f"{self.repo_id}/{self.filename}@{self.revision}"


def _relative(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelsError(f"{where}: '{what}' must be a non-empty string")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise ModelsError(f"{where}: '{what}' must be a relative path without '..': {value!r}")
    return value


def parse_models(data: Any, source: str) -> list[ModelSpec]:
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if not isinstance(data, list):
        raise ModelsError(f"{source}: expected a JSON list of models")
    specs: list[ModelSpec] = []
    known = {"repo_id", "filename", "revision", "folder", "sha256", "name"}
    for index, item in enumerate(data):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise ModelsError(f"{where}: expected an object")
        unknown = sorted(set(item) - known)
        if unknown:
            raise ModelsError(f"{where}: unknown key(s) {', '.join(unknown)}")
        repo_id = item.get("repo_id")
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise ModelsError(f"{where}: 'repo_id' must look like 'owner/name'")
        revision = item.get("revision", "main")
        if not isinstance(revision, str) or not revision:
            raise ModelsError(f"{where}: 'revision' must be a non-empty string")
        sha256 = item.get("sha256")
        if sha256 is not None:
            if not isinstance(sha256, str) or len(sha256) != 64 or set(sha256.lower()) - _HEX:
                raise ModelsError(f"{where}: 'sha256' must be 64 hexadecimal characters")
            sha256 = sha256.lower()
        name = item.get("name")
        specs.append(
            ModelSpec(
                repo_id=repo_id,
                filename=_relative(item.get("filename"), "filename", where),
                folder=_relative(item.get("folder"), "folder", where),
                revision=revision,
                sha256=sha256,
                name=_relative(name, "name", where) if name is not None else None,
            )
        )
    targets = [str(spec.relative_path) for spec in specs]
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise ModelsError(f"{source}: two entries write the same file: {', '.join(duplicates)}")
    return specs


def load_models_file(path: Path) -> list[ModelSpec]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelsError(f"{path}: cannot read: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ModelsError(f"{path}: not valid JSON: {error}") from None
    return parse_models(data, str(path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Record:
    repo_id: str
    filename: str
    revision: str
    sha256: str
    size: int
    mtime_ns: int


@dataclass
class DownloadReport:
    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = (
            f"{len(self.downloaded)} downloaded, {len(self.present)} already present, "
            f"{len(self.failures)} failed"
        )
        if not self.failures:
            return f"models: {head}"
        lines = [f"models download FAILED: {head}"]
        lines += [f"  - {name}: {reason}" for name, reason in self.failures]
        return "\n".join(lines)


def _explain_hub_error(error: Exception, spec: ModelSpec, endpoint: str) -> str:
    """The hub's exceptions as one actionable sentence (their str() is a multi-line dump)."""
    from huggingface_hub import errors

    if isinstance(error, errors.RemoteEntryNotFoundError):
        return f"no file {spec.filename!r} in {spec.repo_id} at revision {spec.revision!r}"
    if isinstance(error, errors.GatedRepoError):
        return f"{spec.repo_id} is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{spec.repo_id} has no revision {spec.revision!r}"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"repository {spec.repo_id} not found at {endpoint} (private? set HF_TOKEN)"
    if isinstance(error, errors.HfHubHTTPError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the hub refused the download: {first}"
    if isinstance(error, errors.LocalEntryNotFoundError):
        return f"cannot reach {endpoint} to download {spec.describe()}"
    return f"{type(error).__name__}: {error}"


class ModelDownloader:
    def __init__(
        self,
        dest: Path,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.dest = dest
        self.token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
        # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
        self.endpoint = (
            endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        ).rstrip("/")
        self.out = out or sys.stderr  # progress is a message; the summary is the data
        self._records: dict[str, _Record] = {}

    def _say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    # -- the record of verified files -----------------------------------------------------

    @property
    def _record_path(self) -> Path:
        return self.dest / RECORD_NAME

    def _load_records(self) -> None:
        try:
            raw = json.loads(self._record_path.read_text(encoding="utf-8"))
            self._records = {key: _Record(**value) for key, value in raw.items()}
        except (OSError, ValueError, TypeError):
            self._records = {}

    def _save_records(self) -> None:
        tmp = self._record_path.with_name(f"{RECORD_NAME}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(
            json.dumps({k: asdict(v) for k, v in sorted(self._records.items())}, indent=2) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, self._record_path)

    def _remember(self, spec: ModelSpec, target: Path, digest: str) -> None:
        stat = target.stat()
        self._records[str(spec.relative_path)] = _Record(
            spec.repo_id, spec.filename, spec.revision, digest, stat.st_size, stat.st_mtime_ns
        )
        self._save_records()

    # -- one file -------------------------------------------------------------------------

    def _verified(self, spec: ModelSpec, target: Path) -> bool:
        """Is the file in place the one asked for? Cheap when the record vouches for it."""
        if not target.is_file():
            return False
        record = self._records.get(str(spec.relative_path))
        same_source = record is not None and (record.repo_id, record.filename, record.revision) == (
            spec.repo_id,
            spec.filename,
            spec.revision,
        )
        expected = spec.sha256 or (record.sha256 if record and same_source else None)
        if expected is None:
            self._say(f"    {spec.relative_path} is present but was never verified; replacing it")
            return False
        stat = target.stat()
        if (
            record is not None
            and same_source
            and record.sha256 == expected
            and (record.size, record.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        ):
            return True
        if sha256_file(target) == expected:
            self._remember(spec, target, expected)
            return True
        self._say(f"    {spec.relative_path} is present but its sha256 differs; replacing it")
        return False

    def _download(self, spec: ModelSpec, target: Path) -> None:
        from huggingface_hub import hf_hub_download

        staging_root = self.dest / STAGING_NAME
        staging = staging_root / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            try:
                fetched = Path(
                    str(
                        hf_hub_download(
                            repo_id=spec.repo_id,
                            filename=spec.filename,
                            revision=spec.revision,
                            local_dir=staging / "files",
                            cache_dir=staging / "cache",
                            token=self.token,
                            endpoint=self.endpoint,
                        )
                    )
                )
            except Exception as error:
                raise ModelsError(_explain_hub_error(error, spec, self.endpoint)) from None
            digest = sha256_file(fetched)
            if spec.sha256 and digest != spec.sha256:
                raise ModelsError(
                    f"sha256 mismatch for {spec.describe()}: expected {spec.sha256}, "
                    f"got {digest}; the file was discarded"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, target)
            self._remember(spec, target, digest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):  # other downloads may still be staging
                staging_root.rmdir()

    # -- all of them ----------------------------------------------------------------------

    def download_all(self, specs: list[ModelSpec]) -> DownloadReport:
        report = DownloadReport()
        self.dest.mkdir(parents=True, exist_ok=True)
        self._load_records()
        for index, spec in enumerate(specs, start=1):
            label = str(spec.relative_path)
            target = self.dest / spec.relative_path
            prefix = f"[{index}/{len(specs)}]"
            if self._verified(spec, target):
                self._say(f"{prefix} {label} already present and verified")
                report.present.append(label)
                continue
            self._say(f"{prefix} downloading {label} from {spec.describe()}")
            try:
                self._download(spec, target)
            except ModelsError as error:
                report.failures.append((label, str(error)))
                self._say(f"    FAILED {label}: {error}")
                continue
            report.downloaded.append(label)
        return report
