"""The HTTP jobs API: submit manifests, follow jobs and read templates without an S3 SDK.

``comfys3 serve`` runs it alone; ``comfys3 run`` runs it beside the worker when
``COMFYS3_API_PORT`` is set. It is a thin room over what the CLI already does (``submit``'s
check, ``status``, ``status --summary``, ``workflows``), so its answers and messages are the
CLI's. FastAPI serves it: the OpenAPI document and the interactive docs come from the same
pydantic models the worker uses.
"""
