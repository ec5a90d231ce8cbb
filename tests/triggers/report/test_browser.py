"""`comfys3 report` of a real run, looked at in a real browser.

The real worker runs a batch on the fake ComfyUI: a seed and prompt sweep (one prompt carries a
<script>), an input file that does not exist, an invalid payload, and a template whose outputs
are a WAV file and a text. Beside them lies a status document that is not one. The report of
that folder is opened from disk in headless Chromium, which shows what a person would see.

Set REPORT_SCREENSHOT=docs/report.png to keep the screenshot (the README's picture is made so).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from PIL import Image

from tests.browser import Chromium, ensure_chromium
from tests.paths import DATA
from tests.processor.worker.test_loop import drain, drop, worker_settings
from triggers.cli.main import main

WORKFLOWS = DATA / "report_workflows"
SCRIPT_PROMPT = 'a cat <script>document.title="pwned";window.pwned=1</script> & "friends"'
SWEEP = [
    {"seed": 101, "prompt": "a red fox in snow"},
    {"seed": 102, "prompt": SCRIPT_PROMPT},
    {"seed": 103, "prompt": "a lighthouse at dusk"},
    {"seed": 104, "prompt": "a bowl of lemons"},
]
COUNTS = """Object.fromEntries([...document.querySelectorAll('#counts [data-state]')]
    .map(e => [e.dataset.state, Number(e.querySelector('b').textContent)]))"""
THUMBS_SETTLED = """(() => { const images = [...document.querySelectorAll('img.thumb')];
    return images.length > 0 && images.every(i => i.complete); })()"""
THUMBS_LOADED = """[...document.querySelectorAll('img.thumb')]
    .filter(i => i.complete && i.naturalWidth > 0).length"""
FAILURE_GROUPS = """[...document.querySelectorAll('details.failure-group')].map(g => ({
    type: g.dataset.errorType,
    count: Number(g.querySelector('.group-count').textContent),
    rows: [...g.querySelectorAll('tr.failure')].map(r => ({
        job: r.cells[0].textContent, attempts: r.cells[2].textContent,
        message: r.cells[3].textContent})) }))"""
FIELDS_OF_SWEEP_2 = """Object.fromEntries([...document.getElementById('job-sweep-2')
    .querySelectorAll('dl.fields dt')]
    .map(dt => [dt.textContent, dt.nextElementSibling.textContent]))"""
OTHER_OUTPUTS = """[...document.querySelectorAll('li.other-output')].map(li => ({
    kind: li.dataset.kind, size: li.querySelector('.size').textContent,
    href: li.querySelector('a') && li.querySelector('a').getAttribute('href') }))"""


def run_batch(root: Path, fake: Any) -> None:
    small = {"steps": 1, "width": 256, "height": 256}
    drop(root, "sweep", {"workflow": "txt2img", "payload": small, "batch": SWEEP})
    drop(root, "scale-missing", {"workflow": "scale", "payload": {"image": "photos/nope.png"}})
    drop(root, "bad-payload", {"workflow": "txt2img", "payload": {"steps": 0}})
    drop(root, "tone", {"workflow": "tone", "payload": {"frequency": 523.25, "caption": "C5"}})
    settings = worker_settings(fake, workflows_dir=WORKFLOWS)
    counts = asyncio.run(drain(root, settings))
    assert (counts.succeeded, counts.failed) == (5, 2)
    broken = root / "output" / "half-written" / "status.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"id": "half-written", "state": "succ')


def test_report_of_a_real_run_in_chromium(tmp_path: Path, fake_comfyui: Any) -> None:
    chromium = ensure_chromium()
    root, out = tmp_path / "jobs", tmp_path / "report"
    run_batch(root, fake_comfyui)

    assert main(["report", "--local", str(root), "--out", str(out)]) == 0

    with Chromium(chromium, tmp_path / "profile", width=1200, height=1350) as page:
        page.open((out / "index.html").resolve().as_uri())
        assert page.wait_until(THUMBS_SETTLED), "thumbnails did not finish loading"
        shot = tmp_path / "report.png"
        page.screenshot(shot)

        counts = page.evaluate(COUNTS)
        loaded = page.evaluate(THUMBS_LOADED)
        groups = page.evaluate(FAILURE_GROUPS)
        fields = page.evaluate(FIELDS_OF_SWEEP_2)
        others = page.evaluate(OTHER_OUTPUTS)
        title = page.evaluate("document.title")
        pwned = page.evaluate("window.pwned === undefined ? null : window.pwned")
        scripts = page.evaluate("document.scripts.length")
        unreadable = page.evaluate("document.querySelector('#unreadable td.message').textContent")

    assert counts == {"total": 8, "succeeded": 5, "failed": 2, "unreadable": 1}
    assert loaded == 4  # one picture per sweep job, each decoded by the browser
    assert [g["type"] for g in groups] == ["input_missing", "invalid_manifest"]
    missing, invalid = groups
    assert missing["count"] == 1 and missing["rows"][0]["job"] == "scale-missing"
    assert missing["rows"][0]["attempts"] == "1 of 3"
    assert "photos/nope.png" in missing["rows"][0]["message"]
    assert invalid["rows"][0]["job"] == "bad-payload" and "steps" in invalid["rows"][0]["message"]
    # The sweep reads at a glance: the fields that vary, the prompt with its <script> as text.
    assert fields == {"seed": "102", "prompt": SCRIPT_PROMPT}
    assert pwned is None and scripts == 0 and "pwned" not in title
    [audio] = others
    assert audio["kind"] == "audio" and audio["size"].endswith("kB")
    linked = (out / unquote(audio["href"])).resolve()  # relative, so it opens from disk
    assert linked.is_file() and linked.parent == (root / "output" / "tone").resolve()
    assert unreadable == "not valid JSON"

    with Image.open(shot) as image:
        assert image.size == (1200, 1350)
        keep = os.environ.get("REPORT_SCREENSHOT")
        if keep:  # a palette PNG: a third of the size, and the page has few colours
            image.convert("RGB").quantize(256).save(keep, optimize=True)
