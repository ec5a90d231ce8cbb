"""How long does ``comfys3 template new`` take to plan and write a template for a big graph?

Real exports hold tens of nodes; a few hundred with custom-node packs. This builds a chain of
``--nodes`` samplers (ids in reverse order, the worst case for ordering, and one shared name
per kind, the worst case for numbering) plus the tests' fixture graphs, and prints for each the
seconds to plan (``plan_template``), to render both files, and to load the result the way a
worker does and check that the empty payload reproduces the graph.

    python bench/template_scaffold.py [--nodes 200 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from processor.template_scaffold import (
    differences,
    plan_template,
    render_graph,
    render_module,
)
from processor.workflows import load_workflow


def chain(nodes: int) -> dict[str, Any]:
    graph = {}
    for i in range(nodes):
        inputs: dict[str, Any] = {"seed": i, "steps": 20, "cfg": 7.0, "sampler_name": "euler"}
        if i:
            inputs["latent_image"] = [str(nodes - i + 1), 0]
        graph[str(nodes - i)] = {"class_type": "KSampler", "inputs": inputs}
    return graph


def measure(name: str, graph: dict[str, Any]) -> None:
    started = time.perf_counter()
    plan = plan_template(graph)
    planned = time.perf_counter()
    texts = render_graph(plan.graph), render_module(plan, "bench", f"{name}.json")
    rendered = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.json"
        path.write_text(texts[0])
        path.with_suffix(".py").write_text(texts[1])
        workflow = load_workflow(path)
        filled = workflow.fill(workflow.validate_payload({}), job_id="bench")
        assert differences(graph, filled) == [], name
    checked = time.perf_counter()
    print(
        f"{name:<22} {len(graph):>6} nodes {len(plan.fields):>6} fields  "
        f"plan {planned - started:7.3f} s  render {rendered - planned:7.3f} s  "
        f"load+check {checked - rendered:7.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[200, 2000])
    args = parser.parse_args()
    for path in sorted((ROOT / "tests" / "data" / "graphs").glob("*.json")):
        if path.stem != "ui_export":
            measure(path.stem, json.loads(path.read_text()))
    for nodes in args.nodes:
        measure(f"chain of {nodes}", chain(nodes))


if __name__ == "__main__":
    main()
