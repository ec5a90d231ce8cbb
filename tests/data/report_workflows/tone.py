"""Test-only template: a tone saved as WAV and a caption shown as text, so a run has outputs
that are not images (the fake ComfyUI's FakeTone, FakeSaveAudio and ShowText nodes)."""

from typing import Annotated

from pydantic import Field

from processor.workflows import Bind, WorkflowPayload


class Payload(WorkflowPayload):
    """A short tone and a caption: the non-image outputs of a report test."""

    frequency: Annotated[float, Bind("1", "frequency")] = Field(
        440.0, ge=20.0, le=4000.0, description="Tone frequency in Hz."
    )
    caption: Annotated[str, Bind("3", "text")] = Field("", description="Text the node shows.")
