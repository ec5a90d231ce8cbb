"""Image to image: re-draw an input image with a Stable Diffusion checkpoint."""

from typing import Annotated

from pydantic import Field

from processor.workflows import (
    Bind,
    InputFile,
    Sampler,
    Scheduler,
    WorkflowPayload,
    random_seed,
)


class Payload(WorkflowPayload):
    """Image to image: re-draw an input image with a Stable Diffusion checkpoint."""

    image: Annotated[str, Bind("1", "image"), InputFile()] = Field(
        min_length=1,
        description="The source image: a key in the bucket (or a path under the local root), an "
        "https:// URL, or s3://bucket/key.",
    )
    denoise: Annotated[float, Bind("3", "denoise")] = Field(
        0.6, ge=0.0, le=1.0, description="How much to change the image (0 keeps it, 1 replaces it)."
    )
    seed: Annotated[int, Bind("3", "seed")] = Field(
        default_factory=random_seed,
        ge=0,
        le=2**64 - 1,
        description="Noise seed; a random one is chosen (and recorded) when omitted.",
    )
    steps: Annotated[int, Bind("3", "steps")] = Field(20, ge=1, le=150, description="Steps.")
    cfg_scale: Annotated[float, Bind("3", "cfg")] = Field(
        7.0, ge=0.0, le=30.0, description="Classifier-free guidance scale."
    )
    sampler_name: Annotated[Sampler, Bind("3", "sampler_name")] = Field(
        "euler", description="ComfyUI sampler."
    )
    scheduler: Annotated[Scheduler, Bind("3", "scheduler")] = Field(
        "normal", description="ComfyUI noise schedule."
    )
    ckpt_name: Annotated[str, Bind("4", "ckpt_name")] = Field(
        "v1-5-pruned-emaonly.safetensors",
        min_length=1,
        description="Checkpoint file in ComfyUI's checkpoints folder.",
    )
    prompt: Annotated[str, Bind("6", "text")] = Field("", description="What to draw.")
    negative_prompt: Annotated[str, Bind("7", "text")] = Field("", description="What to avoid.")
