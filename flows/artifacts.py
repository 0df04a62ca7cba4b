"""Prefect artifacts that the flows publish about their outputs."""

from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from tasks.io.locations import browser_link
from tasks.review.records import ReviewSheet


def publish_location(key: str, location: str, text: str, description: str | None = None) -> None:
    """A link artifact where a browser can follow the location (tasks/io/locations.py `browser_link`), else its path as text.

    A local path as a file:// link would be dead: browsers refuse file:// from the UI's http page.
    """
    link = browser_link(location)
    if link is not None:
        create_link_artifact(key=key, link=link, link_text=text, description=description)
    else:
        path = location.removeprefix("file://")
        create_markdown_artifact(key=key, markdown=f"**{text}**: `{path}` (on the machine that holds the output)", description=description)


def publish_review_artifacts(sheet: ReviewSheet) -> None:
    """The sheet as a link artifact of the current flow run where a browser can follow it, else its path as text.

    No histogram image: a local one would be a file:// URL the UI's page does not load, and an object-store one
    would need a pre-signed URL, a bearer token derived from the storage credentials, in the Prefect database
    for everyone who can read it. The run's histogram is an inline table artifact already.
    """
    overview = sheet.overview
    counts = f"{overview.below_threshold:,} scored samples pass and {overview.at_or_above_threshold:,} are filtered at {overview.score_threshold:g}."
    publish_location(
        "nsfw-filter-review",
        sheet.sheet_url,
        f"review sheet: {len(sheet.samples)} samples across nsfw_score bands",
        counts if browser_link(sheet.sheet_url) is None else f"{counts} Copy the review/ folder to open it (e.g. `aws s3 sync` it to a local directory).",
    )
