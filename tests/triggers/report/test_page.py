"""The report page builder without a browser: what is shown (differing fields, failure groups,
paging, links) and that nothing from a status can become markup."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from processor.job.status import ErrorInfo, JobState, JobStatus, OutputRecord
from processor.storage.layout import Layout
from triggers.report.data import JobRecord
from triggers.report.page import render_pages
from triggers.report.stats import differing_fields, summarize
from triggers.report.thumbs import Thumb
from triggers.report.view import ReportView, build_view

LAYOUT = Layout("input", "output")
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def status(job_id: str, state: JobState = JobState.succeeded, **fields: Any) -> JobStatus:
    # Fixed times: a page built twice must not differ because the clock ticked in between.
    values: dict[str, Any] = {
        "id": job_id,
        "state": state,
        "workflow": "txt2img",
        "created_at": NOW,
        "updated_at": NOW,
    }
    values.update(fields)
    return JobStatus(**values)


def image(job_id: str, name: str = "9_SaveImage_001.png", **fields: Any) -> OutputRecord:
    values: dict[str, Any] = {
        "key": f"output/{job_id}/{name}",
        "node_id": "9",
        "kind": "images",
        "content_type": "image/png",
        "bytes": 1234,
        "sha256": "0" * 64,
    }
    values.update(fields)
    return OutputRecord(**values)


def record(s: JobStatus) -> JobRecord:
    return JobRecord(s.id, LAYOUT.status_key(s.id), status=s)


def view_of(records: list[JobRecord], **kwargs: Any) -> ReportView:
    options: dict[str, Any] = {
        "title": "report",
        "job_prefix": LAYOUT.job_prefix,
        "links": {},
        "thumbs": {},
        "now": NOW,
    }
    options.update(kwargs)
    return build_view(records, **options)


class Page(HTMLParser):
    """What a browser's parser makes of a page: its tags (with attribute names) and its text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, tuple[str, ...]]] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []
        self.pre: list[str] = []  # the payload boxes, apart: their text is JSON
        self._in_pre = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, tuple(name for name, _ in attrs)))
        self.attributes += [(tag, name, value) for name, value in attrs]
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pre[-1] += data
        else:
            self.text.append(data)

    def all_text(self) -> str:
        return "".join(self.text)


# -- differing fields -------------------------------------------------------------------------


def test_a_seed_sweep_differs_in_the_seed_only() -> None:
    sweep = [status(f"s-{n}", payload={"seed": n, "steps": 4, "prompt": "a fox"}) for n in (1, 2)]

    assert differing_fields(sweep) == {"txt2img": ["seed"]}


def test_fields_differ_within_a_workflow_not_across() -> None:
    statuses = [
        status("a", payload={"seed": 1, "prompt": "fox", "extra": {"x": 1, "y": 2}}),
        status("b", payload={"seed": 1, "prompt": "owl", "extra": {"y": 2, "x": 1}}),
        status("c", payload={"seed": 1, "prompt": "fox"}),
        status("d", workflow="scale", payload={"image": "a.png"}),
    ]

    # "extra" is missing from c, so it differs; the same object in another key order does not.
    assert differing_fields(statuses) == {"txt2img": ["prompt", "extra"]}
    assert differing_fields(statuses[:2]) == {"txt2img": ["prompt"]}


def test_a_lone_job_has_nothing_to_compare() -> None:
    assert differing_fields([status("a", payload={"seed": 1})]) == {}


def test_cards_show_the_differing_fields_and_only_those() -> None:
    records = [record(status(f"s-{n}", payload={"seed": n, "steps": 4})) for n in (7, 8)]

    cards = view_of(records).pages[0]

    assert [(f.name, f.value) for f in cards[0].fields] == [("seed", "7")]
    assert [(f.name, f.value) for f in cards[1].fields] == [("seed", "8")]


# -- summary ----------------------------------------------------------------------------------


def test_summary_counts_times_and_span_ignore_implausible_values() -> None:
    start = datetime(2025, 6, 1, 10, 0)  # no zone, as a foreign tool might write it
    statuses = [
        status("a", timings={"execute": 2.0}, created_at=start, updated_at=start),
        status("b", timings={"execute": 4.0}, updated_at=NOW),
        status("c", JobState.failed, timings={"execute": -1.0}),
        status("d", JobState.running, timings={"execute": math.inf}),
        status("e", timings={"execute": 9.0}),
    ]

    summary = summarize(statuses, unreadable=2)

    assert summary.jobs == 7
    assert summary.by_state == {
        "succeeded": 3,
        "failed": 1,
        "cancelled": 0,
        "running": 1,
        "queued": 0,
        "unreadable": 2,
    }
    assert (summary.execute_total, summary.execute_median, summary.timed_jobs) == (15.0, 4.0, 3)
    assert summary.started == start.replace(tzinfo=UTC)
    assert summary.ended is not None and summary.ended >= NOW


# -- failures, unreadable, paging, links ----------------------------------------------------------


def test_failures_are_grouped_by_type_with_message_and_attempts() -> None:
    def failed(job_id: str, kind: str, attempt: int) -> JobRecord:
        error = ErrorInfo(type=kind, message=f"{job_id} went wrong\nsecond line")
        return record(status(job_id, JobState.failed, error=error, attempt=attempt, max_attempts=3))

    records = [
        failed("a", "runtime", 3),
        failed("b", "input_missing", 1),
        failed("c", "runtime", 2),
    ]

    view = view_of(records)

    assert [(g.error_type, g.count) for g in view.failures] == [
        ("runtime", 2),
        ("input_missing", 1),
    ]
    rows = view.failures[0].rows
    assert [(r.job_id, r.attempt) for r in rows] == [("a", "3 of 3"), ("c", "2 of 3")]
    assert rows[0].message == "a went wrong\nsecond line" and rows[0].href == "index.html#job-a"
    assert view.pages[0][0].error_line == "a went wrong"


def test_an_unreadable_status_is_listed_not_raised() -> None:
    records = [
        JobRecord("broken", "output/broken/status.json", problem="not valid JSON"),
        record(status("fine", outputs=[image("fine")])),
    ]

    view = view_of(records)
    html = render_pages(view)["index.html"]

    assert view.header.counts == [("succeeded", 1), ("unreadable", 1)]
    assert [(r.job_id, r.problem) for r in view.unreadable] == [("broken", "not valid JSON")]
    assert view.pages[0][0].state == "unreadable"
    assert 'id="unreadable"' in html and "not valid JSON" in html


def test_big_sets_are_paged_and_failures_link_to_their_page() -> None:
    records = [record(status(f"job-{n:04d}")) for n in range(450)]
    records[420] = record(
        status("job-0420", JobState.failed, error=ErrorInfo(type="x", message="m"))
    )

    view = view_of(records, per_page=200)
    pages = render_pages(view)

    assert list(pages) == ["index.html", "page-2.html", "page-3.html"]
    assert [len(p) for p in view.pages] == [200, 200, 50]
    assert view.failures[0].rows[0].href == "page-3.html#job-job-0420"
    assert 'id="job-job-0420"' in pages["page-3.html"]
    assert 'id="failures"' in pages["index.html"] and 'id="failures"' not in pages["page-2.html"]
    assert 'href="page-2.html"' in pages["index.html"] and "450</b>jobs" in pages["page-3.html"]


def test_outputs_outside_the_job_folder_are_neither_linked_nor_previewed() -> None:
    outputs = [
        image("a", "ok.png"),
        image("a", key="input/_claims/secret.json", content_type="application/json"),
        image("a", key="output/a/../b/x.png"),
        image("a", key="output/b/stolen.png"),
    ]
    links = {o.key: f"L:{o.key}" for o in outputs}
    thumbs = {o.key: Thumb(f"thumbs/{n}.webp") for n, o in enumerate(outputs)}

    card = view_of([record(status("a", outputs=outputs))], links=links, thumbs=thumbs).pages[0][0]

    assert [(o.name, o.href, o.thumb) for o in card.images] == [
        ("ok.png", "L:output/a/ok.png", "thumbs/0.webp")
    ]
    assert [o.href for o in card.others] == [None, None, None]
    assert all("not linked" in (o.note or "") for o in card.others)


def test_non_image_outputs_are_listed_with_kind_and_size() -> None:
    wav = image("t", "2_FakeSaveAudio_001.wav", kind="audio", content_type="audio/wav", bytes=4044)
    texts = {"3": ["C5"]}

    card = view_of([record(status("t", outputs=[wav], texts=texts))]).pages[0][0]

    assert card.images == []
    assert [(o.kind, o.content_type, o.size) for o in card.others] == [
        ("audio", "audio/wav", "4.0 kB")
    ]
    assert card.texts == ["3: C5"]


# -- hostile text -----------------------------------------------------------------------------

HOSTILE = 'fox <script>alert(1)</script> <img src=x onerror="alert(2)"> & \' " </td></table>'


def hostile_records(text: str, key: str = "prompt") -> list[JobRecord]:
    first = status(
        f"id-{text}",
        JobState.failed,
        workflow=f"wf-{text}",
        payload={key: text, "seed": 1},
        metadata={text: text},
        error=ErrorInfo(type=f"type-{text}", message=f"message {text}"),
        outputs=[image(f"id-{text}", f"{text}.bin", kind=text, content_type=text)],
        texts={text: [text]},
    )
    second = status(f"id-{text}", workflow=f"wf-{text}", payload={"seed": 2})
    return [
        JobRecord(f"id-{text}", "output/x/status.json", status=first),
        JobRecord("other", "output/other/status.json", status=second),
        JobRecord(f"u-{text}", f"output/{text}/status.json", problem=f"problem {text}"),
    ]


def test_hostile_text_is_shown_as_text() -> None:
    html = render_pages(view_of(hostile_records(HOSTILE)))["index.html"]
    page = Page(html)

    assert "<script>alert" not in html and 'onerror="' not in html
    assert not any(tag == "script" for tag, _ in page.tags)
    assert not any(name.startswith("on") for _, name, _ in page.attributes)
    assert page.all_text().count(HOSTILE) >= 5  # prompt, message, workflow, problem, ...


# Harmless stand-ins (angle quotation marks, full-width & " ') for what HTML gives meaning to.
LOOKALIKE = str.maketrans(
    {"<": "\u2039", ">": "\u203a", "&": "\uff06", '"': "\uff02", "'": "\uff07"}
)


# What markup is made of, often enough to meet each other; then any character at all.
MARKUP = st.sampled_from([*"<>&\"'/=!-;# \\\n", "<script>", "&amp;", "<!--", "]]>"])


def texts(max_pieces: int) -> st.SearchStrategy[str]:
    pieces = st.lists(st.one_of(MARKUP, st.characters()), min_size=1, max_size=max_pieces)
    return pieces.map("".join)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(text=texts(20), key=texts(6))
def test_no_string_in_a_status_changes_the_page_structure(text: str, key: str) -> None:
    """Whatever a status holds, the page parses into the same tags as when the characters
    HTML cares about are swapped for harmless look-alikes, and reads as the same text."""
    assume(key not in ("seed",) and key.translate(LOOKALIKE) != "seed")
    hostile = Page(render_pages(view_of(hostile_records(text, key)))["index.html"])
    benign = Page(
        render_pages(view_of(hostile_records(text.translate(LOOKALIKE), key.translate(LOOKALIKE))))[
            "index.html"
        ]
    )

    assert hostile.tags == benign.tags
    assert hostile.all_text().translate(LOOKALIKE) == benign.all_text().translate(LOOKALIKE)
    # The payload box reads back as exactly the payload and metadata that were given.
    shown = [json.loads(box) for box in hostile.pre]
    assert shown[0]["payload"] == {key: text, "seed": 1} and shown[0]["metadata"] == {text: text}
    assert shown[1] == {"payload": {"seed": 2}}
