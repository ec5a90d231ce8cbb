"""Resize an input image. Needs no model weights, so it runs on any ComfyUI."""

from typing import Annotated, Literal

from pydantic import Field

from processor.workflows import Bind, InputFile, WorkflowPayload


class Payload(WorkflowPayload):
    """Resize an input image. Needs no model weights, so it runs on any ComfyUI."""

    image: Annotated[str, Bind("1", "image"), InputFile()] = Field(
        min_length=1,
        description="The image to resize: a key in the bucket (or a path under the local root), an "
        "https:// URL, or s3://bucket/key.",
    )
    scale_by: Annotated[float, Bind("2", "scale_by")] = Field(
        2.0, gt=0.0, le=8.0, description="Factor applied to width and height."
    )
    upscale_method: Annotated[
        Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],
        Bind("2", "upscale_method"),
    ] = Field("bilinear", description="Resampling filter.")
