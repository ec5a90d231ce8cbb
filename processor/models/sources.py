"""Where a model's bytes come from: its URL, or Hugging Face's resolve URL for an ``hf`` path.

Hugging Face goes through ``huggingface_hub`` for the address (``hf_hub_url``, which honours
``HF_ENDPOINT`` for a mirror) and the token (``HF_TOKEN``, or the one ``hf auth login`` saved),
and then through the fetch guard like any URL: the guard follows the redirect to Hugging Face's
CDN itself, and the token does not follow it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from huggingface_hub import get_token, hf_hub_url

from processor.models.spec import ModelSpec


@dataclass(frozen=True)
class Source:
    url: str
    headers: dict[str, str] = field(default_factory=dict)


def source_of(spec: ModelSpec) -> Source:
    """The URL (and any credential header) to fetch ``spec`` from."""
    if spec.url is not None:
        return Source(spec.url)
    repo_id, path = spec.hf_repo
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(repo_id, path, revision=spec.revision, endpoint=endpoint)
    token = get_token()
    return Source(url, {"authorization": f"Bearer {token}"} if token else {})
