"""Knobs that make the fake ComfyUI misbehave on purpose.

Tests flip these to reproduce what a real ComfyUI does on a bad day (slow runs, a node raising,
the websocket dropping, the process dying) without needing a GPU. One FakeState is shared by the
HTTP routes, the executor and the test that owns it; plain attribute writes from another thread
are fine because every knob is read fresh at the moment it matters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_CHECKPOINTS = (
    "v1-5-pruned-emaonly.safetensors",
    "random_sd15.safetensors",
    "random_sd15_tinyunet.safetensors",
)

ENV_PREFIX = "FAKE_COMFYUI_"

PROTOCOL_0_3_64 = "0.3.64"
PROTOCOL_CURRENT = "current"
PROTOCOLS = (PROTOCOL_0_3_64, PROTOCOL_CURRENT)


class ConfigError(ValueError):
    """A knob name or value that the fake does not understand."""


@dataclass
class FakeState:
    """Behaviour knobs. Every field can be set in-process, by POST /fake/config, or by env var.

    exec_delay        seconds added to every prompt, spread over the nodes it runs (KSampler: steps)
    fail_at_node      node id that raises a RuntimeError when it starts (execution_error)
    fail_message      the exception message used by fail_at_node
    fail_times        how many prompts fail_at_node still hits; None means every one
    drop_ws_at_node   node id at whose start every websocket is closed (once; then reset to None)
    die_at_node       node id at whose start the process calls os._exit (subprocess mode)
    die_exit_code     exit code used by die_at_node
    die_marker        if set, a file path: die only while it does not exist, and create it first,
                      so a supervisor's restarted process survives the retry
    history_gap       seconds between sending execution_success and writing /history
    installed_checkpoints  the ckpt_name values CheckpointLoaderSimple accepts
    checkpoint_dirs   folders whose files CheckpointLoaderSimple accepts too, listed afresh on
                      every request (as ComfyUI rescans a model folder that changed); main.py
                      fills it from --extra-model-paths-config
    hidden_nodes      node types the fake pretends not to have: absent from /object_info, and
                      refused by POST /prompt like any unknown node (a ComfyUI without them)
    broken_info_nodes node types whose description fails to build, as a real ComfyUI's
                      LoadImage does while its input folder is missing: left out of
                      /object_info, HTTP 500 from /object_info/{type}, but they still run
    preview_frames    KSampler sends binary preview frames per step, as with --preview-method
    startup_delay     seconds main.py waits before listening (ComfyUI boots in 5-9 s)
    gc_pause          seconds the queue stalls after a prompt, at most every gc_interval seconds
                      (ComfyUI's periodic garbage collection: about 0.28 s every 10 s)
    gc_interval       see gc_pause
    first_load_delay  seconds CheckpointLoaderSimple waits the first time it loads a checkpoint
                      in this process (a real ComfyUI reads GBs of weights once, then keeps
                      them); later loads of the same checkpoint are free
    exec_log          if set, a file path: one JSON line is appended when a prompt starts and
                      one when it ends, so executions can be counted across restarts (stats
                      die with the process)
    step_delay        seconds per step of a node with a step count (KSampler), on top of
                      exec_delay: a 40-step prompt with 0.25 runs 10 s with 40 progress events
    protocol          which ComfyUI the fake speaks: "0.3.64" (the recordings) or "current"
                      (0.38.x, see ../shared/comfyui-protocol/DELTA.md): the job API, UUID-only
                      prompt ids, missing_node_type errors, create_time, new /system_stats keys
    assets            current protocol only: output file entries carry an asset `id` (and
                      `preview_id` for images), as with ComfyUI's assets system on
    """

    exec_delay: float = 0.0
    fail_at_node: str | None = None
    fail_message: str = "Fake failure injected by fail_at_node"
    fail_times: int | None = None
    drop_ws_at_node: str | None = None
    die_at_node: str | None = None
    die_exit_code: int = 1
    die_marker: str | None = None
    history_gap: float = 0.02
    installed_checkpoints: list[str] = field(default_factory=lambda: list(DEFAULT_CHECKPOINTS))
    checkpoint_dirs: list[str] = field(default_factory=list)
    hidden_nodes: list[str] = field(default_factory=list)
    broken_info_nodes: list[str] = field(default_factory=list)
    preview_frames: bool = False
    startup_delay: float = 0.0
    gc_pause: float = 0.0
    gc_interval: float = 10.0
    first_load_delay: float = 0.0
    exec_log: str | None = None
    step_delay: float = 0.0
    protocol: str = PROTOCOL_0_3_64
    assets: bool = False

    @property
    def current(self) -> bool:
        """True when the fake speaks today's ComfyUI (0.38.x) rather than 0.3.64."""
        return self.protocol == PROTOCOL_CURRENT

    def update(self, values: Mapping[str, Any]) -> None:
        """Set knobs from a mapping (JSON body or env), converting values; unknown names fail."""
        known = {f.name: f for f in fields(self)}
        for name, raw in values.items():
            if name not in known:
                raise ConfigError(f"unknown fake ComfyUI knob {name!r}; known: {sorted(known)}")
            setattr(self, name, _convert(name, raw))

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FakeState:
        """Read FAKE_COMFYUI_<KNOB> variables, e.g. FAKE_COMFYUI_EXEC_DELAY=0.5."""
        env = os.environ if environ is None else environ
        state = cls()
        wanted = {}
        for f in fields(state):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                wanted[f.name] = env[key]
        state.update(wanted)
        return state


_FLOATS = {
    "exec_delay",
    "history_gap",
    "startup_delay",
    "gc_pause",
    "gc_interval",
    "first_load_delay",
    "step_delay",
}
_OPTIONAL_INTS = {"fail_times"}
_INTS = {"die_exit_code"}
_NODE_IDS = {"fail_at_node", "drop_ws_at_node", "die_at_node", "die_marker", "exec_log"}


def _convert(name: str, raw: Any) -> Any:
    try:
        if name in _FLOATS:
            value = float(raw)
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {raw!r}")
            return value
        if name in _INTS:
            return int(raw)
        if name in _OPTIONAL_INTS:
            return None if raw in (None, "", "none", "None") else int(raw)
        if name in _NODE_IDS:
            return None if raw in (None, "") else str(raw)
        if name == "protocol":
            if raw not in PROTOCOLS:
                raise ConfigError(f"protocol must be one of {list(PROTOCOLS)}, got {raw!r}")
            return raw
        if name in ("preview_frames", "assets"):
            if isinstance(raw, str):
                return raw.strip().lower() in ("1", "true", "yes", "on")
            return bool(raw)
        if name in (
            "installed_checkpoints",
            "checkpoint_dirs",
            "hidden_nodes",
            "broken_info_nodes",
        ):
            if isinstance(raw, str):
                return [part.strip() for part in raw.split(",") if part.strip()]
            return [str(item) for item in raw]
        return str(raw)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad value for {name}: {raw!r} ({exc})") from exc
