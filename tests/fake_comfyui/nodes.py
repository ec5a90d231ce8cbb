"""The node types the fake ComfyUI knows: input specs as ComfyUI declares them, and small
Pillow implementations.

Image nodes do real work on real files so a client's upload -> run -> /view path is tested end to
end. Model nodes are stand-ins: no weights, but the same input specs, validation ranges and output
types as ComfyUI, and VAEDecode paints a deterministic picture from the seed, the prompt text and
the latent size, so tests can tell runs apart. The specs (defaults, min/max, tooltips) follow
ComfyUI 0.3.64 because they are echoed back verbatim in 400 bodies.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import struct
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from .state import FakeState

MAX_RESOLUTION = 16384

InputSpec = tuple[Any, dict[str, Any]]
ImageBatch = list[Image.Image]

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]
SAMPLERS = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]

_PIL_METHODS = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass
class NodeContext:
    """Where a node reads and writes; the knobs it consults (installed checkpoints)."""

    input_dir: Path
    output_dir: Path
    temp_dir: Path
    state: FakeState


@dataclass
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


@dataclass(frozen=True)
class FakeModel:
    """What a checkpoint loader hands on: only the name matters to the fake."""

    kind: str
    ckpt_name: str


@dataclass(frozen=True)
class Conditioning:
    text: str
    ckpt_name: str


@dataclass(frozen=True)
class Latent:
    width: int
    height: int
    batch_size: int
    seed: int | None = None
    text: str = ""
    denoise: float = 1.0
    source: tuple[Image.Image, ...] | None = None


@dataclass(frozen=True)
class Audio:
    sample_rate: int
    samples: bytes  # 16-bit mono little-endian PCM


NodeFunction = Callable[[NodeContext, dict[str, Any]], NodeResult]


@dataclass(frozen=True)
class NodeDef:
    """One node type. `required`/`optional` build the INPUT_TYPES dict (some lists are live)."""

    name: str
    category: str
    return_types: tuple[str, ...]
    function: NodeFunction
    required: Callable[[NodeContext], dict[str, InputSpec]]
    optional: Callable[[NodeContext], dict[str, InputSpec]] = field(default=lambda _ctx: {})
    output_node: bool = False
    description: str = ""
    display_name: str = ""
    output_tooltips: tuple[str, ...] | None = None
    # A custom check like ComfyUI's VALIDATE_INPUTS: returns True or a message. The inputs it
    # takes skip the generic min/max/list checks, exactly as in ComfyUI.
    validate: Callable[[NodeContext, dict[str, Any]], bool | str] | None = None
    validate_inputs: tuple[str, ...] = ()
    # Like IS_CHANGED: part of the cache key, so a re-uploaded file is not served from cache.
    is_changed: Callable[[NodeContext, dict[str, Any]], Any] | None = None
    # Input holding a step count: the executor sends `progress` once per step for this node.
    steps_input: str | None = None
    # HAS_INTERMEDIATE_OUTPUT: today's ComfyUI sends `executed` again for such a node after a
    # successful run in which it came from cache (current protocol only).
    intermediate_output: bool = False

    def input_types(self, ctx: NodeContext) -> dict[str, dict[str, InputSpec]]:
        types = {"required": self.required(ctx)}
        optional = self.optional(ctx)
        if optional:
            types["optional"] = optional
        return types

    def info(self, ctx: NodeContext) -> dict[str, Any]:
        """The /object_info entry."""
        types = self.input_types(ctx)
        out: dict[str, Any] = {
            "input": types,
            "input_order": {section: list(specs) for section, specs in types.items()},
            "output": list(self.return_types),
            "output_is_list": [False] * len(self.return_types),
            "output_name": list(self.return_types),
            "name": self.name,
            "display_name": self.display_name or self.name,
            "description": self.description,
            "python_module": "nodes",
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.output_tooltips:
            out["output_tooltips"] = list(self.output_tooltips)
        if ctx.state.current:  # keys today's ComfyUI adds to every node
            out["is_input_list"] = False
            out["has_intermediate_output"] = self.intermediate_output
            out["search_aliases"] = []
        return out


# --- helpers -------------------------------------------------------------------------------


def installed_checkpoints(ctx: NodeContext) -> list[str]:
    """The knob's names, then the files of the checkpoint folders (an extra model path)."""
    names = list(ctx.state.installed_checkpoints)
    for folder in ctx.state.checkpoint_dirs:
        path = Path(folder)
        if path.is_dir():
            names += sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in names)
    return names


def offered(ctx: NodeContext) -> dict[str, NodeDef]:
    """The node types this fake offers now: every one but the hidden ones."""
    hidden = set(ctx.state.hidden_nodes)
    return {name: node for name, node in NODES.items() if name not in hidden}


def _int(default: int, lo: int, hi: int, step: int | None = 1, **extra: Any) -> InputSpec:
    options: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        options["step"] = step
    options.update(extra)
    return ("INT", options)


def resolve_annotated(ctx: NodeContext, name: str, default_dir: Path | None = None) -> Path:
    """ComfyUI's "name [output]" annotation picks a base directory; plain names use input/."""
    for suffix, base in (
        (" [output]", ctx.output_dir),
        (" [input]", ctx.input_dir),
        (" [temp]", ctx.temp_dir),
    ):
        if name.endswith(suffix):
            return base / name[: -len(suffix)]
    return (default_dir or ctx.input_dir) / name


def _input_files(ctx: NodeContext) -> list[str]:
    try:
        names = [p.name for p in ctx.input_dir.iterdir() if p.is_file()]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(key, value)
    return prefix


def next_save_path(
    base: Path, prefix: str, width: int = 0, height: int = 0
) -> tuple[Path, str, int, str]:
    """Folder, file stem, first free counter and subfolder for `<stem>_<counter:05>_.<ext>`.

    The counter continues after the highest existing `<stem>_NNNNN_*` file, so names never
    repeat within a folder, which is what ComfyUI clients rely on.
    """
    normalised = os.path.normpath(_expand_prefix(prefix, width, height))
    subfolder = os.path.dirname(normalised)
    stem = os.path.basename(normalised)
    folder = (base / subfolder).resolve()
    if os.path.commonpath((str(base.resolve()), str(folder))) != str(base.resolve()):
        raise Exception(  # ComfyUI raises a bare Exception here too
            "**** ERROR: Saving image outside the output folder is not allowed."
        )
    folder.mkdir(parents=True, exist_ok=True)
    highest = 0
    for entry in os.listdir(folder):
        if not entry.startswith(stem + "_"):
            continue
        digits = entry[len(stem) + 1 :].split("_")[0]
        if digits.isdigit():
            highest = max(highest, int(digits))
    return folder, stem, highest + 1, subfolder


def _save_batch(
    images: ImageBatch, base: Path, prefix: str, kind: str, compress_level: int
) -> dict[str, Any]:
    width, height = images[0].size if images else (0, 0)
    folder, stem, counter, subfolder = next_save_path(base, prefix, width, height)
    results = []
    for batch_number, image in enumerate(images):
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        image.save(folder / name, compress_level=compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"images": results}


def render_picture(seed: int, text: str, width: int, height: int, index: int) -> Image.Image:
    """A smooth, deterministic 'generated' image: the same inputs always give the same pixels."""
    rng = random.Random(f"{seed}|{text}|{width}x{height}|{index}")
    tiny = Image.frombytes("RGB", (4, 4), rng.randbytes(4 * 4 * 3))
    return tiny.resize((max(width, 1), max(height, 1)), Image.Resampling.BICUBIC)


# --- node implementations ------------------------------------------------------------------


def _empty_image(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    color = kw["color"]
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    images = [Image.new("RGB", (kw["width"], kw["height"]), rgb) for _ in range(kw["batch_size"])]
    return NodeResult((images,))


def _load_image(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    path = resolve_annotated(ctx, kw["image"])
    with Image.open(path) as img:
        oriented = ImageOps.exif_transpose(img)
        rgb = oriented.convert("RGB")
        if "A" in oriented.getbands():
            mask = ImageOps.invert(oriented.getchannel("A"))
        else:
            mask = Image.new("L", (64, 64), 0)
    return NodeResult(([rgb], [mask]))


def _load_image_changed(ctx: NodeContext, kw: dict[str, Any]) -> Any:
    path = resolve_annotated(ctx, str(kw.get("image", "")))
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _load_image_validate(ctx: NodeContext, kw: dict[str, Any]) -> bool | str:
    if not resolve_annotated(ctx, str(kw.get("image", ""))).exists():
        return f"Invalid image file: {kw.get('image')}"
    return True


def _scale(image: Image.Image, width: int, height: int, method: str, crop: str) -> Image.Image:
    if width <= 0 or height <= 0:
        raise RuntimeError(
            "Input and output sizes should be greater than 0, but got input "
            f"(H: {image.height}, W: {image.width}) output (H: {height}, W: {width})"
        )
    if crop == "center":
        old_aspect = image.width / image.height
        new_aspect = width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((image.width - image.width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((image.height - image.height * (old_aspect / new_aspect)) / 2)
        image = image.crop((x, y, image.width - x, image.height - y))
    return image.resize((width, height), _PIL_METHODS[method])


def _image_scale(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    width, height = kw["width"], kw["height"]
    out = []
    for image in kw["image"]:
        if width == 0 and height == 0:
            out.append(image)
            continue
        w = width or max(1, round(image.width * height / image.height))
        h = height or max(1, round(image.height * width / image.width))
        out.append(_scale(image, w, h, kw["upscale_method"], kw["crop"]))
    return NodeResult((out,))


def _image_scale_by(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    factor = kw["scale_by"]
    out = [
        _scale(
            img,
            round(img.width * factor),
            round(img.height * factor),
            kw["upscale_method"],
            "disabled",
        )
        for img in kw["image"]
    ]
    return NodeResult((out,))


def _image_invert(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult(([ImageOps.invert(img) for img in kw["image"]],))


def _image_blur(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    radius = kw["blur_radius"] * kw["sigma"] / 2.0
    return NodeResult(([img.filter(ImageFilter.GaussianBlur(radius)) for img in kw["image"]],))


def _save_image(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult(
        ui=_save_batch(kw["images"], ctx.output_dir, kw["filename_prefix"], "output", 4)
    )


def _preview_image(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    suffix = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    ui = _save_batch(kw["images"], ctx.temp_dir, f"ComfyUI_temp_{suffix}", "temp", 1)
    return NodeResult(ui=ui)


def _checkpoint_loader(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    name = kw["ckpt_name"]
    return NodeResult((FakeModel("MODEL", name), FakeModel("CLIP", name), FakeModel("VAE", name)))


def _clip_text_encode(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult((Conditioning(kw["text"], kw["clip"].ckpt_name),))


def _empty_latent(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult((Latent(kw["width"], kw["height"], kw["batch_size"]),))


def _vae_encode(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    images = kw["pixels"]
    width, height = images[0].size
    return NodeResult((Latent(width, height, len(images), source=tuple(images)),))


def _ksampler(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    latent: Latent = kw["latent_image"]
    text = f"{kw['positive'].text}|{kw['negative'].text}|{kw['model'].ckpt_name}|{kw['cfg']}"
    sampled = Latent(
        latent.width,
        latent.height,
        latent.batch_size,
        seed=kw["seed"],
        text=text,
        denoise=kw["denoise"],
        source=latent.source,
    )
    return NodeResult((sampled,))


def _vae_decode(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    latent: Latent = kw["samples"]
    # Like a real VAE: the latent is 1/8 of the pixels, so sizes come back as multiples of 8.
    width, height = max(8, latent.width // 8 * 8), max(8, latent.height // 8 * 8)
    seed = latent.seed if latent.seed is not None else 0
    images = []
    for index in range(latent.batch_size):
        picture = render_picture(seed, latent.text, width, height, index)
        if latent.source is not None:
            source = latent.source[min(index, len(latent.source) - 1)].resize((width, height))
            picture = Image.blend(source, picture, max(0.0, min(1.0, latent.denoise)))
        images.append(picture)
    return NodeResult((images,))


def _show_text(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    return NodeResult((kw["text"],), ui={"text": [kw["text"]]})


def _tone(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    rate = 8000
    count = int(rate * kw["seconds"])
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * kw["frequency"] * i / rate)))
        for i in range(count)
    )
    return NodeResult((Audio(rate, frames),))


def _save_audio(ctx: NodeContext, kw: dict[str, Any]) -> NodeResult:
    audio: Audio = kw["audio"]
    folder, stem, counter, subfolder = next_save_path(ctx.output_dir, kw["filename_prefix"])
    name = f"{stem}_{counter:05}_.wav"
    with wave.open(str(folder / name), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(audio.sample_rate)
        out.writeframes(audio.samples)
    return NodeResult(ui={"audio": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


# --- the registry ---------------------------------------------------------------------------

_IMAGE: InputSpec = ("IMAGE", {})


def _registry() -> dict[str, NodeDef]:
    defs = [
        NodeDef(
            "EmptyImage",
            "image",
            ("IMAGE",),
            _empty_image,
            lambda ctx: {
                "width": _int(512, 1, MAX_RESOLUTION),
                "height": _int(512, 1, MAX_RESOLUTION),
                "batch_size": _int(1, 1, 4096, step=None),
                "color": _int(0, 0, 0xFFFFFF, display="color"),
            },
        ),
        NodeDef(
            "LoadImage",
            "image",
            ("IMAGE", "MASK"),
            _load_image,
            lambda ctx: {"image": (_input_files(ctx), {"image_upload": True})},
            validate=_load_image_validate,
            validate_inputs=("image",),
            is_changed=_load_image_changed,
            display_name="Load Image",
        ),
        NodeDef("ImageInvert", "image", ("IMAGE",), _image_invert, lambda ctx: {"image": _IMAGE}),
        NodeDef(
            "ImageScale",
            "image/upscaling",
            ("IMAGE",),
            _image_scale,
            lambda ctx: {
                "image": _IMAGE,
                "upscale_method": (list(UPSCALE_METHODS), {}),
                "width": _int(512, 0, MAX_RESOLUTION),
                "height": _int(512, 0, MAX_RESOLUTION),
                "crop": (list(CROP_METHODS), {}),
            },
        ),
        NodeDef(
            "ImageScaleBy",
            "image/upscaling",
            ("IMAGE",),
            _image_scale_by,
            lambda ctx: {
                "image": _IMAGE,
                "upscale_method": (list(UPSCALE_METHODS), {}),
                "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
            },
        ),
        NodeDef(
            "ImageBlur",
            "image/postprocessing",
            ("IMAGE",),
            _image_blur,
            lambda ctx: {
                "image": _IMAGE,
                "blur_radius": _int(1, 1, 31),
                "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            },
        ),
        NodeDef(
            "SaveImage",
            "image",
            (),
            _save_image,
            lambda ctx: {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": "The prefix for the file to save. This may include formatting "
                        "information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to "
                        "include values from nodes.",
                    },
                ),
            },
            output_node=True,
            description="Saves the input images to your ComfyUI output directory.",
            display_name="Save Image",
        ),
        NodeDef(
            "PreviewImage",
            "image",
            (),
            _preview_image,
            lambda ctx: {"images": _IMAGE},
            output_node=True,
            description="Saves the input images to your ComfyUI temp directory.",
            display_name="Preview Image",
        ),
        NodeDef(
            "CheckpointLoaderSimple",
            "loaders",
            ("MODEL", "CLIP", "VAE"),
            _checkpoint_loader,
            lambda ctx: {
                "ckpt_name": (
                    installed_checkpoints(ctx),
                    {"tooltip": "The name of the checkpoint (model) to load."},
                ),
            },
            display_name="Load Checkpoint",
        ),
        NodeDef(
            "CLIPTextEncode",
            "conditioning",
            ("CONDITIONING",),
            _clip_text_encode,
            lambda ctx: {
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The text to be encoded.",
                    },
                ),
                "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
            },
        ),
        NodeDef(
            "EmptyLatentImage",
            "latent",
            ("LATENT",),
            _empty_latent,
            lambda ctx: {
                "width": _int(
                    512,
                    16,
                    MAX_RESOLUTION,
                    step=8,
                    tooltip="The width of the latent images in pixels.",
                ),
                "height": _int(
                    512,
                    16,
                    MAX_RESOLUTION,
                    step=8,
                    tooltip="The height of the latent images in pixels.",
                ),
                "batch_size": _int(
                    1, 1, 4096, step=None, tooltip="The number of latent images in the batch."
                ),
            },
        ),
        NodeDef(
            "VAEEncode",
            "latent",
            ("LATENT",),
            _vae_encode,
            lambda ctx: {"pixels": ("IMAGE", {}), "vae": ("VAE", {})},
        ),
        NodeDef(
            "KSampler",
            "sampling",
            ("LATENT",),
            _ksampler,
            lambda ctx: {
                "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
                "seed": _int(
                    0,
                    0,
                    0xFFFFFFFFFFFFFFFF,
                    step=None,
                    control_after_generate=True,
                    tooltip="The random seed used for creating the noise.",
                ),
                "steps": _int(
                    20,
                    1,
                    10000,
                    step=None,
                    tooltip="The number of steps used in the denoising process.",
                ),
                "cfg": (
                    "FLOAT",
                    {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01},
                ),
                "sampler_name": (list(SAMPLERS), {}),
                "scheduler": (list(SCHEDULERS), {}),
                "positive": ("CONDITIONING", {}),
                "negative": ("CONDITIONING", {}),
                "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            steps_input="steps",
        ),
        NodeDef(
            "VAEDecode",
            "latent",
            ("IMAGE",),
            _vae_decode,
            lambda ctx: {
                "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
            },
        ),
        # Non-image outputs, so clients can test them: a text shower (history output
        # {"text": [...]}, like the popular ShowText custom node) and an audio saver
        # ({"audio": [{filename, subfolder, type}]}, like SaveAudio but writing WAV).
        NodeDef(
            "ShowText",
            "utils",
            ("STRING",),
            _show_text,
            lambda ctx: {"text": ("STRING", {"multiline": True})},
            output_node=True,
        ),
        NodeDef(
            "FakeTone",
            "audio",
            ("AUDIO",),
            _tone,
            lambda ctx: {
                "seconds": ("FLOAT", {"default": 0.25, "min": 0.01, "max": 10.0, "step": 0.01}),
                "frequency": ("FLOAT", {"default": 440.0, "min": 20.0, "max": 4000.0}),
            },
        ),
        NodeDef(
            "FakeSaveAudio",
            "audio",
            (),
            _save_audio,
            lambda ctx: {
                "audio": ("AUDIO", {}),
                "filename_prefix": ("STRING", {"default": "audio/ComfyUI"}),
            },
            output_node=True,
        ),
    ]
    return {d.name: d for d in defs}


def _all_nodes() -> dict[str, NodeDef]:
    from .media import media_nodes  # media builds on this module's helpers

    nodes = _registry()
    nodes.update({node.name: node for node in media_nodes()})
    return nodes


NODES: dict[str, NodeDef] = _all_nodes()
