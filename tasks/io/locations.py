"""Storage locations: the `Location` value, where things live by default, and the rules for URLs.

A `Location` is a clean URL or local path together with the fsspec storage options (credentials, endpoint)
that reach it. The plan builds one for each place a run touches (the inputs, the store, the output, each
weight file), once, from what the user passed; everything below the plan receives those values and asks
them for their filesystem, so no function there takes storage options. Its `str` and `repr` are the
clean URL: they never show credentials.

The defaults (model weights, local copies of weights given as URLs, the embedding store) live here too;
the flow's parameter model and the CLI read them from here. Credentials written into URLs go through
`resolve_url_credentials`, which moves them into storage options at planning, so every URL a run holds,
writes or prints is clean.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union
from urllib.parse import unquote

from tasks.errors import UserError

if TYPE_CHECKING:
    import fsspec

MODEL_DIR_ENV = "NSFW_CURATOR_MODEL_DIR"
CACHE_PATH_ENV = "NSFW_CURATOR_CACHE_PATH"
FINGERPRINT_CACHE_ENV = "NSFW_CURATOR_FINGERPRINT_CACHE"
WEIGHTS_CACHE_ENV = "NSFW_CURATOR_WEIGHTS_CACHE"


class Location:
    """A place in storage: its clean URL (or local path) and the storage options that reach it.

    Immutable and small: it pickles with its options (a task on another machine needs them to read), and
    it is compared and hashed by URL and options. `str()` and `repr()` give the URL only.
    """

    __slots__ = ("_url", "_options")

    def __init__(self, url: "str | os.PathLike | Location", storage_options: Mapping[str, Any] | None = None) -> None:
        if isinstance(url, Location):  # the same place; its own options unless others are given
            url, storage_options = url.url, url._options if storage_options is None else storage_options
        url = os.fspath(url)
        if not isinstance(url, str) or not url:
            raise UserError(f"a storage location must be a non-empty path or URL, not {url!r}.")
        if _USERINFO.match(url):
            raise ValueError("a Location's URL carries no credentials: split them off with resolve_url_credentials first")
        object.__setattr__(self, "_url", url)
        object.__setattr__(self, "_options", dict(storage_options or {}))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Location is immutable")

    @property
    def url(self) -> str:
        """The clean URL or path, as given (what names, identities and messages use)."""
        return self._url

    @property
    def storage_options(self) -> dict[str, Any]:
        """A copy of the fsspec options, for libraries that take them beside a URL (pyarrow, pandas)."""
        return dict(self._options)

    def filesystem(self) -> tuple["fsspec.AbstractFileSystem", str]:
        """The fsspec filesystem and the protocol-less path; UserError for an unknown protocol or a missing backend.

        fsspec keeps one filesystem instance per options, process and thread, so asking again is cheap.
        """
        from fsspec.core import url_to_fs

        try:
            return url_to_fs(self._url, **self._options)
        except ValueError as exc:
            if "Protocol not known" not in str(exc):
                raise
            protocol = self._url.split("://", 1)[0]
            raise UserError(
                f"{self._url} uses the unknown protocol '{protocol}://'; use a local path, file://, s3:// or another fsspec protocol."
            ) from None
        except ImportError as exc:
            raise UserError(f"{self._url} needs a filesystem package that is not installed ({exc}); install it and retry.") from None

    @property
    def fs(self) -> "fsspec.AbstractFileSystem":
        return self.filesystem()[0]

    @property
    def path(self) -> str:
        return self.filesystem()[1]

    def at(self, url: str | os.PathLike) -> "Location":
        """Another URL reached with the same options (a shard found by listing this input, say)."""
        return Location(url, self._options)

    def join(self, *parts: str) -> "Location":
        """The location `parts` below this one (`{url}/{part}/...`)."""
        return Location("/".join([self._url.rstrip("/"), *parts]), self._options)

    def __truediv__(self, part: str) -> "Location":
        return self.join(part)

    def __str__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"Location({self._url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self._url == other._url and self._options == other._options

    def __hash__(self) -> int:
        return hash(self._url)

    def __reduce__(self) -> tuple:
        return (Location, (self._url, self._options))


LocationLike = Union[Location, str, os.PathLike]


def as_location(value: LocationLike) -> Location:
    """`value` as a Location: a Location as it is; a path or clean URL as one reached with the environment's
    credentials (what tests and library callers pass)."""
    return value if isinstance(value, Location) else Location(value)


def object_size(info: dict) -> int | None:
    """The size in bytes a filesystem's `info` (or listing entry) gives, or None where it gives none."""
    size = info.get("size")
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def safe_name(name: str) -> str:
    """A file-name-safe form of a model or shard name (letters, digits, `.`, `_`, `-`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "unnamed"


def default_model_dir() -> str:
    """`$NSFW_CURATOR_MODEL_DIR`, else `~/.cache/nsfw-curator/models`."""
    return os.environ.get(MODEL_DIR_ENV) or str(Path.home() / ".cache" / "nsfw-curator" / "models")


def default_cache_path() -> str:
    """`$NSFW_CURATOR_CACHE_PATH`, else `~/.cache/nsfw-curator/embeddings` (use `s3://...` in production)."""
    return os.environ.get(CACHE_PATH_ENV) or str(Path.home() / ".cache" / "nsfw-curator" / "embeddings")


def default_fingerprint_cache_dir() -> Path:
    """`$NSFW_CURATOR_FINGERPRINT_CACHE`, else `$XDG_CACHE_HOME/nsfw-curator/fingerprints` (`~/.cache/...`): the
    user's own folder for weight files' SHA-256 digests, so nothing is ever written beside a model file."""
    explicit = os.environ.get(FINGERPRINT_CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nsfw-curator" / "fingerprints"


def default_weights_cache_dir() -> Path:
    """`$NSFW_CURATOR_WEIGHTS_CACHE`, else `$XDG_CACHE_HOME/nsfw-curator/weights` (`~/.cache/...`): this machine's
    copies of weights given as URLs, one file per weight named by its SHA-256 (tasks/models/remote_weights.py)."""
    explicit = os.environ.get(WEIGHTS_CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nsfw-curator" / "weights"


def clip_weights_dir(model_dir: str | os.PathLike, clip_model: str) -> Path:
    """CLIP checkpoints for a model name: `{model_dir}/clip/{clip_model}/{pretrained_tag}.{safetensors,bin,pt}`."""
    return Path(model_dir) / "clip" / clip_model


def nsfw_weights_path(model_dir: str | os.PathLike, clip_model: str) -> Path:
    """The NSFW head for a CLIP model: `{model_dir}/nsfw/{clip_model}.safetensors`."""
    return Path(model_dir) / "nsfw" / f"{clip_model}.safetensors"


# ---------------------------------------------------------------------------------------------------
# Credentials written into URLs (`s3://KEY:SECRET@bucket/...`): taken out of the URL once, at planning,
# and handed to the filesystem as storage options, so no URL the run holds, stores or prints carries them.

_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<userinfo>[^/?#]*)@")
# Credentials taken from URLs by the command line (so they never reach Prefect's flow-run parameters),
# by location (`s3://bucket`); they live in this process only.
_held_credentials: dict[str, dict[str, Any]] = {}


def split_url_credentials(url: str) -> tuple[str, dict[str, Any]]:
    """(the URL without `user:password@`, the fsspec storage options carrying them; {} when there are none)."""
    match = _USERINFO.match(url) if isinstance(url, str) else None
    if match is None:
        return url, {}
    scheme = match.group("scheme").lower()
    user, has_password, password = match.group("userinfo").partition(":")
    user, password = unquote(user), unquote(password) if has_password else None
    clean = f"{match.group('scheme')}://{url[match.end():]}"
    if scheme in ("s3", "s3a"):
        options = {"key": user, "secret": password}
    elif scheme in ("http", "https"):
        import aiohttp

        options = {"client_kwargs": {"auth": aiohttp.BasicAuth(user, password or "")}}
    else:  # ftp, sftp, smb, ...: fsspec's own names
        options = {"username": user, "password": password}
    return clean, {name: value for name, value in options.items() if value is not None}


def _location(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0]}" if rest else url


def _each_url(value: str | list[str] | tuple[str, ...]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    return [part for item in items if isinstance(item, str) for part in item.split("::")]


def _strip(value: Any, found: list[dict[str, Any]]) -> Any:
    """`value` (a URL, a `::`-joined list of URLs, or a list of them) without credentials; what they held is appended to `found`."""
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(item, found) for item in value)
    if not isinstance(value, str):
        return value
    parts = []
    for part in value.split("::"):
        clean, options = split_url_credentials(part)
        if options:
            found.append(options)
        parts.append(clean)
    return "::".join(parts)


def hold_url_credentials(value: Any) -> Any:
    """`value` without URL credentials; they are kept in this process for `resolve_url_credentials` to find."""
    found: list[dict[str, Any]] = []
    clean = _strip(value, found)
    if found:
        for url, options in zip([u for u in _each_url(value) if _USERINFO.match(u)], found):
            _held_credentials[_location(split_url_credentials(url)[0])] = options
    return clean


def resolve_url_credentials(*values: Any, storage_options: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """`values` (URLs or lists of them) without credentials, then the storage options with those credentials added.

    One run uses one set of storage options for all its URLs, so URLs carrying different credentials, or
    credentials that contradict `storage_options`, are a UserError (the message names no secret).
    """
    found: list[dict[str, Any]] = []
    clean = tuple(_strip(value, found) for value in values)
    for value in clean:
        for url in _each_url(value) if value is not None else []:
            if _location(url) in _held_credentials:
                found.append(_held_credentials[_location(url)])
    merged = dict(storage_options or {})
    for options in found:
        for name, value in options.items():
            if name in merged and merged[name] != value:
                raise UserError(
                    "the URLs of this run carry different storage credentials (or ones that contradict the storage options); "
                    "one run uses one set: put them in the environment or a storage_options_secret block instead."
                )
            merged[name] = value
    return (*clean, merged)


def refuse_output_file(output: Location) -> None:
    """UserError when the output is an existing file: outputs need a directory or prefix (checked before any work)."""
    try:
        fs, path = output.filesystem()
        is_file = fs.isfile(path)
    except Exception:  # noqa: BLE001 - an unreachable location is reported by the listing and writing steps
        return
    if is_file:
        raise UserError(f"output_path {output} is an existing file; pass a directory or prefix for the outputs.")


def redacted(url: str | Location) -> str:
    """The URL without any `user:password@` part, for messages and metadata (up to the last `@` before the path:
    a secret may hold one)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@", r"\1", str(url))


def scrubbed(text: str, url: str) -> str:
    """`text` (an error message about `url`) with the URL's `user:password@` removed wherever it appears."""
    match = _USERINFO.match(url) if isinstance(url, str) else None
    return str(text).replace(match.group("userinfo") + "@", "") if match and match.group("userinfo") else str(text)


def browser_link(location: str) -> str | None:
    """The URL a link in the Prefect UI may point at for an output location: object-store and web URLs as they
    are; None for a local path or file:// URL, which a browser refuses from the UI's http page (show it as text)."""
    if "://" not in location or location.startswith("file://"):
        return None
    return location
