"""What a manifest says about a model it needs: where to fetch it, what it must hash to, and
where ComfyUI looks for it.

```json
"models": [
  {"url": "https://example.com/my-lora.safetensors", "sha256": "...", "folder": "loras"},
  {"hf": "org/repo/sd15/model.safetensors", "folder": "checkpoints", "name": "sd15.safetensors"}
]
```

``name`` is the file name ComfyUI lists (what the workflow's loader input names); it defaults to
the last part of the URL or path. A model is known by ``folder`` and ``name``: two manifests
naming the same pair get the same file, fetched once.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ComfyUI's model folders (folder_paths.py) that hold single files, with the legacy names it
# still reads: a model goes where its loader node looks.
ModelFolder = Literal[
    "checkpoints", "loras", "vae", "text_encoders", "clip", "diffusion_models", "unet",
    "clip_vision", "style_models", "embeddings", "vae_approx", "controlnet", "t2i_adapter",
    "gligen", "upscale_models", "latent_upscale_models", "hypernetworks", "photomaker",
    "classifiers", "model_patches", "audio_encoders",
]  # fmt: skip
MODEL_FOLDERS: tuple[str, ...] = ModelFolder.__args__  # type: ignore[attr-defined]
MAX_MODELS = 32

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.+()\[\]-]{0,199}$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_model_name(value: str) -> str:
    """A file name inside one model folder: no folders, nothing hidden, nothing that climbs."""
    if not _NAME.match(value) or ".." in value:
        raise ValueError(
            "must be a file name (letters, digits, space, _ . + - ( ) [ ]; no '/', no '..', "
            "not starting with '.'), at most 200 characters"
        )
    return value


class ModelSpec(BaseModel):
    """One model the job needs: fetched into the worker's model cache before the prompt runs,
    unless it is there already."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        None,
        max_length=2048,
        description="https URL of the file (http only where the worker allows it).",
    )
    hf: str | None = Field(
        None,
        max_length=512,
        description="A file on Hugging Face: org/repo/path/in/repo/file.safetensors.",
    )
    revision: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="With hf: a branch, tag or commit (default: main).",
    )
    sha256: str | None = Field(
        None,
        description="Hex SHA-256 of the file; a download that does not match fails the job.",
        json_schema_extra={"pattern": _SHA256.pattern},
    )
    folder: ModelFolder = Field(description="ComfyUI's model folder: checkpoints, loras, vae ...")
    name: str | None = Field(
        None,
        description="File name in that folder, as the workflow names it "
        "(default: the last part of the URL or path).",
    )

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not _SHA256.match(value):
            raise ValueError("must be 64 hexadecimal digits")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().startswith(("https://", "http://")):
            raise ValueError("must be an https:// URL")
        return value

    @field_validator("hf")
    @classmethod
    def _hf(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.strip("/").split("/")
        if len(parts) < 3 or not all(_HF_PART.match(part) for part in parts) or ".." in parts:
            raise ValueError(
                "must be org/repo/path/to/file (letters, digits, . _ -), "
                "e.g. Comfy-Org/stable-diffusion-v1-5-archive/v1-5-pruned-emaonly-fp16.safetensors"
            )
        return "/".join(parts)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.url is None) == (self.hf is None):
            raise ValueError("give either 'url' or 'hf' (a Hugging Face path), not both or neither")
        if self.revision is not None and self.hf is None:
            raise ValueError("'revision' goes with 'hf' only")
        if self.name is None:
            object.__setattr__(self, "name", self._default_name())
        assert self.name is not None
        try:
            check_model_name(self.name)
        except ValueError as error:
            raise ValueError(f"name {self.name!r} {error}") from None
        return self

    def _default_name(self) -> str:
        if self.hf is not None:
            return self.hf.rsplit("/", 1)[-1]
        assert self.url is not None
        return unquote(urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1])

    @property
    def file_name(self) -> str:
        assert self.name is not None
        return self.name

    @property
    def label(self) -> str:
        """``checkpoints/my-model.safetensors``: how messages name it."""
        return f"{self.folder}/{self.file_name}"

    @property
    def hf_repo(self) -> tuple[str, str]:
        """(repo id, path in the repo) of an ``hf`` model."""
        assert self.hf is not None
        org, repo, path = self.hf.split("/", 2)
        return f"{org}/{repo}", path
