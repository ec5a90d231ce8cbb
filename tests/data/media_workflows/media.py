"""Test-only template: every output kind ComfyUI has in one graph, on the fake ComfyUI's nodes:
core video (SaveVideo, SaveWEBM, SaveAnimatedWEBP), VideoHelperSuite's gifs, audio as FLAC,
MP3 and Opus, a text (PreviewAny), a 3-D model (SaveGLB) and a still image."""

from typing import Annotated

from pydantic import Field

from processor.workflows import Bind, WorkflowPayload


class Payload(WorkflowPayload):
    """Every output kind: the outputs of the media tests."""

    caption: Annotated[str, Bind("11", "source")] = Field("", description="Text PreviewAny shows.")
    frames: Annotated[int, Bind("24", "batch_size")] = Field(
        3, ge=1, le=8, description="Frames of the videos and animations."
    )
