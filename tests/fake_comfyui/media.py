"""Output nodes for video, audio, text and 3-D, reporting what ComfyUI reports.

The history/`executed` shapes follow ComfyUI's own savers (comfy_api/latest/_ui.py and the core
nodes): core video (SaveVideo, SaveWEBM, SaveAnimatedWEBP) lands under `images` with
`animated: [true]`, never under a `video` key; SaveAudio/SaveAudioMP3/SaveAudioOpus under
`audio` as `<prefix>_<counter:05>.<ext>` (no trailing underscore, unlike images); PreviewAny
under `text`; and the VideoHelperSuite custom node VHS_VideoCombine under `gifs`, with its
extra `format`, `frame_rate`, `workflow` and `fullpath` keys. 3-D as in 0.3.64's
comfy_extras: SaveGLB under `3d` (`<prefix>_<counter:05>_.glb`), and Preview3D, which only names
a model file as the first item of `result`. Every file is real: animated WebP and GIF from
Pillow, the rest from containers.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import containers
from .nodes import (
    Audio,
    ImageBatch,
    NodeContext,
    NodeDef,
    NodeResult,
    next_save_path,
)

_IMAGE = ("IMAGE", {})


@dataclass(frozen=True)
class Video:
    """What core CreateVideo hands to SaveVideo: frames at a frame rate (audio ignored)."""

    frames: tuple[Image.Image, ...]
    fps: float


def _saved(name: str, subfolder: str, kind: str = "output") -> dict[str, Any]:
    return {"filename": name, "subfolder": subfolder, "type": kind}


def _size(images: ImageBatch) -> tuple[int, int]:
    return images[0].size if images else (0, 0)


def _write_animation(path: Path, frames: ImageBatch, fps: float) -> None:
    """Pillow writes real animated WebP and GIF files (the format follows the extension)."""
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(path, save_all=True, append_images=rest, duration=int(1000.0 / fps), loop=0)


# --- core video -------------------------------------------------------------------------------


def _create_video(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult((Video(tuple(kw["images"]), float(kw["fps"])),))


def _save_video(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    video: Video = kw["video"]
    width, height = _size(list(video.frames))
    folder, stem, counter, subfolder = next_save_path(
        ctx.output_dir, kw["filename_prefix"], width, height
    )
    name = f"{stem}_{counter:05}_.mp4"
    containers.write_mp4(folder / name)
    return NodeResult(ui={"images": [_saved(name, subfolder)], "animated": [True]})


def _save_webm(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    width, height = _size(kw["images"])
    folder, stem, counter, subfolder = next_save_path(
        ctx.output_dir, kw["filename_prefix"], width, height
    )
    name = f"{stem}_{counter:05}_.webm"
    containers.write_webm(folder / name)
    return NodeResult(ui={"images": [_saved(name, subfolder)], "animated": [True]})


def _save_animated_webp(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    images: ImageBatch = kw["images"]
    width, height = _size(images)
    folder, stem, counter, subfolder = next_save_path(
        ctx.output_dir, kw["filename_prefix"], width, height
    )
    name = f"{stem}_{counter:05}_.webp"
    _write_animation(folder / name, images, float(kw["fps"]))
    ui: dict[str, Any] = {"images": [_saved(name, subfolder)]}
    if len(images) > 1:
        ui["animated"] = [True]
    return NodeResult(ui=ui)


# --- core audio -------------------------------------------------------------------------------


def _audio_saver(ext: str) -> Any:
    def save(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
        audio: Audio = kw["audio"]
        folder, stem, counter, subfolder = next_save_path(ctx.output_dir, kw["filename_prefix"])
        name = f"{stem}_{counter:05}.{ext}"
        samples = len(audio.samples) // 2
        if ext == "flac":
            containers.write_flac(folder / name, audio.sample_rate, 1, samples)
        elif ext == "mp3":
            containers.write_mp3(folder / name)
        else:
            containers.write_opus(folder / name, 48000, 1)  # Opus resamples to 48 kHz
        return NodeResult(ui={"audio": [_saved(name, subfolder)]})

    return save


# --- text -------------------------------------------------------------------------------------


def _preview_any(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    source = kw["source"]
    if isinstance(source, str):
        text = source
    elif isinstance(source, int | float | bool):
        text = str(source)
    else:
        try:
            text = json.dumps(source, indent=4)
        except (TypeError, ValueError):
            text = str(source)
    return NodeResult(ui={"text": [text]})


# --- 3-D -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mesh:
    """What a 3-D generator hands to SaveGLB (only the count matters here: one file each)."""

    count: int


def _fake_mesh(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult((Mesh(int(kw["count"])),))


def _save_glb(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    mesh: Mesh = kw["mesh"]
    folder, stem, counter, subfolder = next_save_path(ctx.output_dir, kw["filename_prefix"])
    results = []
    for index in range(mesh.count):
        name = f"{stem}_{counter + index:05}_.glb"
        containers.write_glb(folder / name)
        results.append(_saved(name, subfolder))
    return NodeResult(ui={"3d": results})


def _preview_3d(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult(ui={"result": [kw["model_file"], kw.get("camera_info")]})


# --- an intermediate preview ------------------------------------------------------------------


def _preview_passthrough(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    images: ImageBatch = kw["images"]
    suffix = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    folder, stem, counter, subfolder = next_save_path(ctx.temp_dir, f"ComfyUI_temp_{suffix}")
    name = f"{stem}_{counter:05}_.png"
    images[0].save(folder / name, compress_level=1)
    return NodeResult((images,), ui={"images": [_saved(name, subfolder, "temp")]})


# --- VideoHelperSuite -------------------------------------------------------------------------

VHS_FORMATS = {
    "image/gif": "gif",
    "image/webp": "webp",
    "video/h264-mp4": "mp4",
    "video/webm": "webm",
}


def _vhs_video_combine(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    images: ImageBatch = kw["images"]
    save_output = bool(kw.get("save_output", True))
    base = ctx.output_dir if save_output else ctx.temp_dir
    folder, stem, counter, subfolder = next_save_path(base, kw["filename_prefix"])
    first_image = f"{stem}_{counter:05}.png"  # VHS keeps the workflow in a still of frame 1
    images[0].save(folder / first_image, compress_level=4)
    fmt = kw["format"]
    ext = VHS_FORMATS[fmt]
    name = f"{stem}_{counter:05}.{ext}"
    path = folder / name
    if ext in ("gif", "webp"):
        _write_animation(path, images, float(kw["frame_rate"]))
    elif ext == "mp4":
        containers.write_mp4(path)
    else:
        containers.write_webm(path)
    preview = {
        **_saved(name, subfolder, "output" if save_output else "temp"),
        "format": fmt,
        "frame_rate": float(kw["frame_rate"]),
        "workflow": first_image,
        "fullpath": str(path),
    }
    return NodeResult(
        ((save_output, [str(folder / first_image), str(path)]),), ui={"gifs": [preview]}
    )


def media_nodes() -> list[NodeDef]:
    prefix = ("STRING", {"default": "ComfyUI"})
    return [
        NodeDef(
            "CreateVideo",
            "image/video",
            ("VIDEO",),
            _create_video,
            lambda ctx: {
                "images": ("IMAGE", {"tooltip": "The images to create a video from."}),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}),
            },
            optional=lambda ctx: {"audio": ("AUDIO", {})},
            display_name="Create Video",
        ),
        NodeDef(
            "SaveVideo",
            "image/video",
            (),
            _save_video,
            lambda ctx: {
                "video": ("VIDEO", {"tooltip": "The video to save."}),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                "format": (["auto", "mp4"], {"default": "auto"}),
                "codec": (["auto", "h264"], {"default": "auto"}),
            },
            output_node=True,
            display_name="Save Video",
        ),
        NodeDef(
            "SaveWEBM",
            "image/video",
            (),
            _save_webm,
            lambda ctx: {
                "images": _IMAGE,
                "filename_prefix": prefix,
                "codec": (["vp9", "av1"], {}),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "crf": ("FLOAT", {"default": 32.0, "min": 0, "max": 63.0, "step": 1}),
            },
            output_node=True,
        ),
        NodeDef(
            "SaveAnimatedWEBP",
            "image/animation",
            (),
            _save_animated_webp,
            lambda ctx: {
                "images": _IMAGE,
                "filename_prefix": prefix,
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "lossless": ("BOOLEAN", {"default": True}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                "method": (["default", "fastest", "slowest"], {}),
            },
            output_node=True,
        ),
        NodeDef(
            "SaveAudio",
            "audio",
            (),
            _audio_saver("flac"),
            lambda ctx: {
                "audio": ("AUDIO", {}),
                "filename_prefix": ("STRING", {"default": "audio/ComfyUI"}),
            },
            output_node=True,
            display_name="Save Audio (FLAC)",
        ),
        NodeDef(
            "SaveAudioMP3",
            "audio",
            (),
            _audio_saver("mp3"),
            lambda ctx: {
                "audio": ("AUDIO", {}),
                "filename_prefix": ("STRING", {"default": "audio/ComfyUI"}),
                "quality": (["V0", "128k", "320k"], {"default": "V0"}),
            },
            output_node=True,
            display_name="Save Audio (MP3)",
        ),
        NodeDef(
            "SaveAudioOpus",
            "audio",
            (),
            _audio_saver("opus"),
            lambda ctx: {
                "audio": ("AUDIO", {}),
                "filename_prefix": ("STRING", {"default": "audio/ComfyUI"}),
                "quality": (["64k", "96k", "128k", "192k", "320k"], {"default": "128k"}),
            },
            output_node=True,
            display_name="Save Audio (Opus)",
        ),
        NodeDef(
            "PreviewAny",
            "utils",
            (),
            _preview_any,
            lambda ctx: {"source": ("*", {})},
            output_node=True,
            display_name="Preview Any",
        ),
        NodeDef(
            "FakeMesh",
            "3d",
            ("MESH",),
            _fake_mesh,
            lambda ctx: {"count": ("INT", {"default": 1, "min": 1, "max": 8})},
            description="Stands in for a 3-D generator (Hunyuan3D's VAEDecodeHunyuan3D ...).",
        ),
        NodeDef(
            "SaveGLB",
            "3d",
            (),
            _save_glb,
            lambda ctx: {
                "mesh": ("MESH", {}),
                "filename_prefix": ("STRING", {"default": "mesh/ComfyUI"}),
            },
            output_node=True,
        ),
        NodeDef(
            "Preview3D",
            "3d",
            (),
            _preview_3d,
            lambda ctx: {"model_file": ("STRING", {"default": "", "multiline": False})},
            optional=lambda ctx: {"camera_info": ("LOAD3D_CAMERA", {})},
            output_node=True,
        ),
        NodeDef(
            "FakePreviewPassthrough",
            "image",
            ("IMAGE",),
            _preview_passthrough,
            lambda ctx: {"images": _IMAGE},
            description="Passes images on and previews the first (HAS_INTERMEDIATE_OUTPUT).",
            intermediate_output=True,
        ),
        NodeDef(
            "VHS_VideoCombine",
            "Video Helper Suite 🎥🅥🅗🅢",
            ("VHS_FILENAMES",),
            _vhs_video_combine,
            lambda ctx: {
                "images": _IMAGE,
                "frame_rate": ("FLOAT", {"default": 8, "min": 1, "step": 1}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 100, "step": 1}),
                "filename_prefix": ("STRING", {"default": "AnimateDiff"}),
                "format": (list(VHS_FORMATS), {}),
                "pingpong": ("BOOLEAN", {"default": False}),
                "save_output": ("BOOLEAN", {"default": True}),
            },
            output_node=True,
            display_name="Video Combine 🎥🅥🅗🅢",
        ),
    ]
