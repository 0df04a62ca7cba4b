"""Prefect artifacts that the flows publish about their outputs."""

from __future__ import annotations

import os

from prefect.artifacts import create_image_artifact, create_link_artifact

from tasks.review.records import ReviewSheet


def publish_review_artifacts(sheet: ReviewSheet) -> None:
    """The sheet as a link artifact of the current flow run, and the histogram PNG as an image where a browser can open it.

    An object-store histogram gets no image artifact: a pre-signed URL would put a bearer token derived from the
    storage credentials into the Prefect database for everyone who can read it (the counts and the histogram
    table are artifacts of the run already).
    """
    local = "://" not in sheet.sheet_url or sheet.sheet_url.startswith("file://")
    if local:
        create_image_artifact(
            image_url="file://" + os.path.abspath(sheet.histogram_url.removeprefix("file://")),
            key="nsfw-filter-review-histogram",
            description="nsfw_score histogram of the run, threshold marked (a file:// URL: the browser must run on the machine that holds the output)",
        )
    overview = sheet.overview
    create_link_artifact(
        key="nsfw-filter-review",
        link=sheet.sheet_url if "://" in sheet.sheet_url else "file://" + sheet.sheet_url,
        link_text=f"review sheet: {len(sheet.samples)} samples across nsfw_score bands",
        description=(
            f"{overview.below_threshold:,} scored samples pass and {overview.at_or_above_threshold:,} are filtered at {overview.score_threshold:g}. "
            + ("" if local else "Copy the review/ folder to open it (e.g. `aws s3 sync` it to a local directory).")
        ),
    )
