"""``comfys3 template new``: a workflow template from a graph the user built in the ComfyUI editor.

The user exports their graph with "Export (API)"; this command writes ``NAME.json`` (the graph,
unchanged) and ``NAME.py`` (a payload model with a field for each value worth varying) into a
folder that ``COMFYS3_WORKFLOWS_DIR`` can name. Before writing, it loads the new template the
way a worker will and checks that the empty payload gives back the user's graph exactly, so a
template it writes is one that runs.

Exit codes: 0 written (or shown with ``--dry-run``), 1 ComfyUI could not be asked for its
``/object_info``, 2 unusable input (not an API graph, a bad name, files that exist, ...).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from processor import (
    Comfys3Error,
    FieldPlan,
    FixedValue,
    JsonLimitError,
    NodeCatalog,
    Plan,
    ScaffoldError,
    builtin_workflows_dir,
    check_template_name,
    differences,
    load_json,
    load_workflow,
    parse_graph,
    plan_template,
    render_graph,
    render_module,
)
from triggers.cli.help_format import show_help

MAX_GRAPH_BYTES = 64 * 1024 * 1024
MAX_OBJECT_INFO_BYTES = 256 * 1024 * 1024  # many custom nodes make a large catalogue
OBJECT_INFO_TIMEOUT = 30.0


class ComfyUnreachable(Comfys3Error):
    """ComfyUI could not be asked for its /object_info (refused, timed out, an HTTP error)."""


def cmd_template_new(args: argparse.Namespace) -> int:
    try:
        name = check_template_name(args.name)
        graph = parse_graph(_read(Path(args.source), MAX_GRAPH_BYTES), source=args.source)
        catalog = _catalog(args.object_info) if args.object_info else None
        plan = plan_template(graph, catalog)
    except ScaffoldError as error:
        return _fail(str(error), 2)
    except ComfyUnreachable as error:
        return _fail(str(error), 1)
    folder = Path(args.dir)
    paths = (folder / f"{name}.json", folder / f"{name}.py")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.force and not args.dry_run:
        verb = "exists" if len(existing) == 1 else "exist"
        return _fail(f"{' and '.join(existing)} already {verb}; add --force to replace", 2)
    texts = (render_graph(plan.graph), render_module(plan, name, args.source))
    problem = _self_check(name, plan, texts)
    if problem is not None:
        return _fail(problem, 1)
    if not args.dry_run:
        try:
            _write(folder, paths, texts)
        except OSError as error:
            return _fail(f"cannot write into {folder}: {error.strerror or error}", 2)
    print("\n".join(_report(plan, name, folder, paths, dry_run=args.dry_run)))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"comfys3: {message}", file=sys.stderr)
    return code


def _read(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as error:
        raise ScaffoldError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > limit:
        raise ScaffoldError(f"{path} is larger than {limit // (1024 * 1024)} MB")
    return data


def _catalog(where: str) -> NodeCatalog:
    """ComfyUI's node catalogue from a saved /object_info answer or a running ComfyUI."""
    if where.startswith(("http://", "https://")):
        data, source = _fetch_object_info(where)
    else:
        data, source = _read(Path(where), MAX_OBJECT_INFO_BYTES), where
    try:
        document = load_json(data)
    except JsonLimitError as error:
        raise ScaffoldError(f"object_info from {source} {error}") from None
    return NodeCatalog.from_object_info(document, source)


def _fetch_object_info(url: str) -> tuple[bytes, str]:
    url = url.rstrip("/")
    if not url.endswith("/object_info"):
        url += "/object_info"
    try:
        with urllib.request.urlopen(url, timeout=OBJECT_INFO_TIMEOUT) as response:
            data: bytes = response.read(MAX_OBJECT_INFO_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise ComfyUnreachable(f"GET {url} answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise ComfyUnreachable(f"cannot get {url}: {reason}") from None
    if len(data) > MAX_OBJECT_INFO_BYTES:
        raise ScaffoldError(f"{url} sent more than {MAX_OBJECT_INFO_BYTES // 2**20} MB")
    return data, url


def _self_check(name: str, plan: Plan, texts: tuple[str, str]) -> str | None:
    """Load the template as a worker will and fill it with ``{}``: it must give back the graph.
    A failure here is a bug of the scaffolder, said before anything is written."""
    with tempfile.TemporaryDirectory(prefix="comfys3-template-") as scratch:
        graph_path = Path(scratch) / f"{name}.json"
        graph_path.write_text(texts[0], encoding="utf-8")
        graph_path.with_suffix(".py").write_text(texts[1], encoding="utf-8")
        try:
            workflow = load_workflow(graph_path)
            filled = workflow.fill(workflow.validate_payload({}), job_id="check")
        except Exception as error:  # a bug of ours: say it, never a traceback
            return f"the generated template does not load ({error}); please report this"
    found = differences(plan.graph, filled)
    if found:
        return "the generated template does not reproduce the graph: " + "; ".join(found)
    return None


def _write(folder: Path, paths: tuple[Path, Path], texts: tuple[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in zip(paths, texts, strict=True):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)


# --- what the user reads -----------------------------------------------------------------------


def _report(
    plan: Plan, name: str, folder: Path, paths: tuple[Path, Path], *, dry_run: bool
) -> list[str]:
    verb = "would write" if dry_run else "wrote"
    lines = [f"{verb} {paths[0]} and {paths[1]}", ""]
    lines.append(f"fields ({len(plan.fields)}), each defaulting to the graph's own value:")
    width = max((len(f.name) for f in plan.fields), default=4) + 2
    for item in plan.fields:
        lines.append(
            f"  {item.name:<{width}}{_type(item):<18}{_value(item.graph_value):<34}"
            f"{_targets(item, plan)}"
        )
    if plan.fixed:
        lines += ["", f"left fixed ({len(plan.fixed)}):"]
        lines += [f"  {_fixed(value)}" for value in plan.fixed]
    notes = [*plan.notes, *_folder_notes(name, folder)]
    if notes:
        lines += ["", "notes:", *(f"  {note}" for note in notes)]
    where = shlex.quote(str(folder))
    lines += [
        "",
        "next:",
        f"  COMFYS3_WORKFLOWS_DIR={where} comfys3 workflows {name}",
        f'  echo \'{{"workflow": "{name}", "payload": {{}}}}\' > job.json   # the graph as saved',
        f"  COMFYS3_WORKFLOWS_DIR={where} comfys3 validate job.json",
    ]
    return lines


def _type(item: FieldPlan) -> str:
    if item.input_file:
        return "input file"
    if item.choices:
        return f"{item.python_type} ({len(item.choices)})"
    return item.python_type


def _value(value: Any, limit: int = 32) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _targets(item: FieldPlan, plan: Plan) -> str:
    first = item.targets[0]
    class_type = plan.graph[first.node]["class_type"]
    return ", ".join(str(t) for t in item.targets) + f" ({class_type})"


def _fixed(value: FixedValue) -> str:
    note = f"  ({value.note})" if value.note else ""
    return f"{value.node}.{value.input} = {_value(value.value, 48)}  [{value.class_type}]{note}"


def _folder_notes(name: str, folder: Path) -> list[str]:
    notes = []
    if (builtin_workflows_dir() / f"{name}.json").exists():
        notes.append(f"'{name}' replaces the built-in template of that name where {folder} is used")
    if folder.is_dir():
        for graph in sorted(folder.glob("*.json")):
            if graph.stem != name and not graph.with_suffix(".py").exists():
                notes.append(
                    f"{graph} has no {graph.stem}.py: comfys3 refuses a templates folder with a "
                    "graph alone, so move it out of the way"
                )
    return notes


def register(subparsers: argparse._SubParsersAction) -> None:
    template = subparsers.add_parser(
        "template",
        help="make a workflow template from your own ComfyUI graph",
        description="Make workflow templates from graphs built in the ComfyUI editor.",
    )
    commands = template.add_subparsers(title="commands", metavar="COMMAND")
    template.set_defaults(handler=lambda args: show_help(template))
    new = commands.add_parser(
        "new",
        help="write NAME.json and NAME.py from a graph saved with the editor's Export (API)",
        description=(
            "Read a graph exported with the ComfyUI editor's Export (API) and write NAME.json "
            "(the graph, unchanged) and NAME.py (its payload model) into DIR. Each value worth "
            "varying becomes a field with the graph's own value as its default: prompts "
            "(positive and negative), seeds, steps, cfg, sampler and scheduler, denoise, image "
            "size and batch, model files, LoRA strengths, and LoadImage inputs as input files. "
            "An empty payload runs the graph exactly as saved. The fields made and the values "
            "left fixed are printed; edit NAME.py to change either. Then set "
            "COMFYS3_WORKFLOWS_DIR=DIR."
        ),
    )
    new.add_argument("name", metavar="NAME", help="the template's name, e.g. my_portrait")
    new.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="GRAPH.json",
        help="the graph, as the editor's Export (API) saves it",
    )
    new.add_argument(
        "--dir",
        default="workflows",
        metavar="DIR",
        help="where to write the two files (default: %(default)s)",
    )
    new.add_argument(
        "--object-info",
        metavar="FILE_OR_URL",
        help="what your ComfyUI offers: a file saved from its GET /object_info, or its URL "
        "(e.g. http://127.0.0.1:8188); sampler and scheduler then become lists of its choices",
    )
    new.add_argument("--force", action="store_true", help="replace NAME.json and NAME.py")
    new.add_argument(
        "--dry-run", action="store_true", help="print the fields and fixed values; write nothing"
    )
    new.set_defaults(handler=cmd_template_new)
