"""A solid-colour image, inverted. Needs no weights and no input: the smoke test of a worker."""

from typing import Annotated

from pydantic import Field

from processor.workflows import Bind, WorkflowPayload


class Payload(WorkflowPayload):
    """A solid-colour image, inverted. Needs no weights and no input: a worker's smoke test."""

    width: Annotated[int, Bind("1", "width")] = Field(64, ge=1, le=4096, description="Width.")
    height: Annotated[int, Bind("1", "height")] = Field(64, ge=1, le=4096, description="Height.")
    batch_size: Annotated[int, Bind("1", "batch_size")] = Field(
        1, ge=1, le=64, description="Images made in one run."
    )
    color: Annotated[int, Bind("1", "color")] = Field(
        0, ge=0, le=0xFFFFFF, description="Colour before inversion, as 0xRRGGBB."
    )
