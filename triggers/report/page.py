"""A report view -> its static HTML pages.

Rendering is Jinja2 with autoescaping on for every value: prompts, error messages, job ids and
metadata come from users and from the bucket, so nothing reaches the page as markup unless the
template itself wrote it. The pages run no script at all, and their Content-Security-Policy
forbids one, so a string that slipped through escaping still could not execute.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined, Template

from triggers.report.view import ReportView, page_file

TEMPLATE = "report.html.j2"


@lru_cache(maxsize=1)
def _template() -> Template:
    environment = Environment(
        loader=PackageLoader("triggers.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    return environment.get_template(TEMPLATE)


def render_pages(view: ReportView) -> dict[str, str]:
    """File name -> HTML of every page: ``index.html`` first, then ``page-2.html`` ..."""
    files = [page_file(index) for index in range(len(view.pages))]
    template = _template()
    return {
        files[index]: template.render(
            header=view.header,
            failures=view.failures,
            unreadable=view.unreadable,
            unreadable_hidden=view.unreadable_hidden,
            cards=cards,
            page_index=index,
            pages=files,
        )
        for index, cards in enumerate(view.pages)
    }
