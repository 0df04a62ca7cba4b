"""Errors that earlier versions wrote into store entries for samples this version scores.

An entry's identity names how pixels become embeddings. When a version stops refusing some images and
makes the same pixels as before for every image both versions accept, the identity stays the same:
changing it would make every user embed every shard again. An entry that holds a row refused for a
retired reason is then stale, not corrupt: whoever reads it embeds that shard again, once (the entry
it writes has no such row), and every other entry stays a hit.

Retired so far: the 100:1 aspect-ratio limit ("one side over 100 times the other"), dropped when the
model's transform began resizing only what its centre crop keeps (tasks/models/bounded_transform.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Whole sentences as the retired checks wrote them (the reader's image check, now tasks/io/decode.py, before banners were scored),
# and as the reader shortened them to 160 characters for a long member name.
RETIRED_ERRORS = (
    re.compile(r"image '.*' is \d+x\d+ pixels, one side over [0-9.e+]+ times the other \(the limit for resizing it\)"),
    re.compile(r"image '.*' is \d+x\d+ pixels, one side over .*\.\.\.", re.DOTALL),
)


def first_retired_error(errors: Sequence[str | None]) -> int | None:
    """The first row whose error a retired check wrote (its sample is scored now), or None."""
    for row, error in enumerate(errors):
        if error is not None and any(pattern.fullmatch(error) for pattern in RETIRED_ERRORS):
            return row
    return None
