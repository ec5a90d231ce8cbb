"""Every output kind end to end: video (core and VideoHelperSuite), audio, text and 3-D run by a
worker on both ComfyUI protocols, stored with the right extension and content type, listed in
the status, and shown by the report with a player or a link, never a broken thumbnail."""

from __future__ import annotations

import asyncio
import io
import json
import re
from html import unescape as html_unescape
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from PIL import Image

from processor.job.status import JobState
from tests.fake_comfyui.fixtures import both_protocols
from tests.paths import DATA
from tests.processor.worker.test_loop import drain, drop, status_of, worker_settings
from triggers.cli import main as cli

MEDIA_WORKFLOWS = DATA / "media_workflows"

# node -> (kind, extension, content type) as the status lists them
EXPECTED = {
    "3": ("images", ".mp4", "video/mp4"),
    "4": ("images", ".webm", "video/webm"),
    "5": ("images", ".webp", "image/webp"),
    "6": ("gifs", ".gif", "image/gif"),
    "8": ("audio", ".flac", "audio/flac"),
    "9": ("audio", ".mp3", "audio/mpeg"),
    "10": ("audio", ".opus", "audio/ogg"),
    "13": ("3d", ".glb", "model/gltf-binary"),
    "14": ("images", ".jpg", "image/jpeg"),
}


@both_protocols
async def test_every_output_kind_is_stored_listed_and_shown(
    tmp_path: Path, fake_comfyui: Any, fake_protocol: str
) -> None:
    if fake_protocol == "current":
        fake_comfyui.state.assets = True
    root = tmp_path / "jobs"
    # JPEG for still images: the still is converted, the animation must not be (one frame).
    drop(root, "all", {"workflow": "media", "payload": {"caption": "a caption"},
                       "output": {"format": "jpeg"}})  # fmt: skip

    counts = await drain(root, worker_settings(fake_comfyui, workflows_dir=MEDIA_WORKFLOWS))

    assert counts.succeeded == 1
    status = status_of(root, "all")
    assert status.state is JobState.succeeded
    found = {
        o.node_id: (o.kind, Path(o.key).suffix, o.content_type.split(";")[0])
        for o in status.outputs
    }
    assert found == EXPECTED
    assert [o.node_id for o in status.outputs].count("14") == 3  # one still per frame
    assert status.texts == {"11": ["a caption"]}
    assert all(len((root / o.key).read_bytes()) == o.bytes for o in status.outputs)
    files = {o.node_id: (root / o.key).read_bytes() for o in status.outputs}
    with Image.open(io.BytesIO(files["5"])) as animation:
        assert animation.format == "WEBP" and animation.n_frames == 3
    with Image.open(io.BytesIO(files["14"])) as still:
        assert still.format == "JPEG"
    assert files["13"][:4] == b"glTF"

    out = tmp_path / "report"
    arguments = ["report", "all", "--local", str(root), "--out", str(out)]
    assert await asyncio.to_thread(cli.main, arguments) == 0
    html = (out / "index.html").read_text()
    players = re.findall(r'<(video|audio) class="player" [^>]*src="([^"]+)"', html)
    assert sorted((tag, Path(src).suffix) for tag, src in players) == [
        ("audio", ".flac"),
        ("audio", ".mp3"),
        ("audio", ".opus"),
        ("video", ".mp4"),
        ("video", ".webm"),
    ]
    for _, src in players:
        assert (out / unquote(html_unescape(src))).resolve().is_file()  # opens from disk
    # Stills and animations get thumbnails; the model a link; the text is shown.
    assert len(re.findall(r'<img class="thumb"', html)) == 5  # webp, gif, three jpegs
    assert re.search(r'data-media="3d"><a href="[^"]+13_SaveGLB_001\.glb"', html)
    assert "11: a caption" in html
    assert "5 images" in html and "2 video" in html and "3 audio" in html and "1 3d" in html


async def test_a_preview3d_of_a_file_that_is_not_an_output_does_not_fail_the_job(
    tmp_path: Path, fake_comfyui: Any
) -> None:
    graph = {
        "1": {"class_type": "Preview3D", "inputs": {"model_file": "3d/uploaded.glb"}},
        "2": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }  # fmt: skip
    drop(tmp_path, "preview", {"graph": graph})
    await drain(tmp_path, worker_settings(fake_comfyui, allow_raw_workflows=True))
    status = status_of(tmp_path, "preview")
    assert status.state is JobState.succeeded
    assert [o.node_id for o in status.outputs] == ["3"]
    assert status.texts == {}


def test_the_media_template_is_a_valid_manifest() -> None:
    assert json.loads((MEDIA_WORKFLOWS / "media.json").read_text())["11"]["class_type"]
