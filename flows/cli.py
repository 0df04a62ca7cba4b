"""`nsfw-curator` command line: each subcommand parses its arguments and calls a flow or a function."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import typing
from typing import Any, Callable, Sequence

from tasks.errors import UserError
from tasks.locations import default_model_dir, nsfw_weights_path

def _add_score_embeddings(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score-embeddings",
        help="score CLIP embeddings you already have (.npy or Parquet) with the LAION NSFW head",
        description="Score CLIP image embeddings computed elsewhere (for example clip-retrieval's img_emb/*.npy) "
        "and write Parquet with `nsfw_score` (float32, null when not scored) and `error` added; other "
        "Parquet columns such as `key` are carried over.",
    )
    parser.add_argument("--input", required=True, help="a .npy of shape [N, D], or Parquet with an `embedding` list column")
    parser.add_argument("--output", required=True, help="the Parquet file to write (local path or fsspec URL)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--nsfw-weights", help="an NSFW-head safetensors file")
    weights.add_argument("--model-dir", help="the model directory; the head for --clip-model is read from it")
    parser.add_argument("--clip-model", default="ViT-L-14", help="with --model-dir: which CLIP model the embeddings come from (default: ViT-L-14)")
    parser.add_argument("--model-inference-batch-size", type=int, default=32, help="rows scored per batch (default: 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(handler=_run_score_embeddings)


def _run_score_embeddings(args: argparse.Namespace) -> int:
    import torch

    from tasks.nsfw import load_nsfw_head
    from tasks.score_file import score_embedding_file

    weights = args.nsfw_weights or nsfw_weights_path(args.model_dir, args.clip_model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    head = load_nsfw_head(weights, device=device)
    rows = score_embedding_file(args.input, args.output, head, batch_size=args.model_inference_batch_size, device=device)
    print(f"scored {rows} embeddings -> {args.output}")
    return 0


def _add_models(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="get or convert model weights")
    models = parser.add_subparsers(dest="models_command", required=True, metavar="{fetch,convert-laion}")
    fetch = models.add_parser(
        "fetch",
        help="download CLIP and the LAION NSFW head into --model-dir",
        description="Download the CLIP weights (through open_clip) and LAION's NSFW head (converted to safetensors) "
        "into the layout the pipeline reads offline. Skips what is already there.",
    )
    fetch.add_argument("--model-dir", default=default_model_dir(), help="where weights go (default: %(default)s)")
    fetch.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name (default: ViT-L-14)")
    fetch.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag (default: openai)")
    fetch.set_defaults(handler=_run_models_fetch)
    convert = models.add_parser(
        "convert-laion",
        help="convert LAION's Keras NSFW-detector zip to safetensors",
        description="Convert LAION's original Keras/AutoKeras zip (clip_autokeras_binary_nsfw.zip or "
        "clip_autokeras_nsfw_b32.zip) into the safetensors head the pipeline loads. Needs no TensorFlow.",
    )
    convert.add_argument("zip", help="LAION's zip file")
    convert.add_argument("out", help="the safetensors file to write")
    convert.set_defaults(handler=_run_convert_laion)


def _run_models_fetch(args: argparse.Namespace) -> int:
    from tasks.model_fetch import fetch_models

    for path in fetch_models(args.model_dir, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained):
        print(path)
    return 0


def _run_convert_laion(args: argparse.Namespace) -> int:
    from tasks.laion_convert import convert_laion_zip

    print(convert_laion_zip(args.zip, args.out))
    return 0


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def add_flow_arguments(parser: argparse.ArgumentParser, flow_fn: Callable) -> None:
    """One `--kebab-case` option per flow parameter, typed and documented from the flow's signature and docstring."""
    from prefect.utilities.callables import parameter_docstrings

    docs = parameter_docstrings(inspect.getdoc(flow_fn))
    hints = typing.get_type_hints(flow_fn)
    for name, parameter in inspect.signature(flow_fn).parameters.items():
        annotation = hints[name]
        option = "--" + name.replace("_", "-")
        required = parameter.default is inspect.Parameter.empty
        default = None if required else parameter.default
        help_text = docs.get(name, "")
        if not required and default not in (None, False):
            help_text += f" (default: {' '.join(default) if isinstance(default, list) else default})"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "required": required, "default": default}
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif _is_list(annotation):
            kwargs["nargs"] = "+"
        else:
            scalar = args[0] if args else annotation
            kwargs["type"] = scalar if scalar in (int, float) else str
        parser.add_argument(option, **kwargs)


def flow_arguments(args: argparse.Namespace, flow_fn: Callable) -> dict[str, Any]:
    """The flow's keyword arguments from parsed options (a one-item list for `str | list[str]` becomes the str)."""
    hints = typing.get_type_hints(flow_fn)
    values = {}
    for name in inspect.signature(flow_fn).parameters:
        value = getattr(args, name)
        if isinstance(value, list) and len(value) == 1 and typing.get_origin(hints[name]) is typing.Union and str in typing.get_args(hints[name]):
            value = value[0]
        values[name] = value
    return values


def _flow_command(name: str, module: str, flow_name: str, help_text: str, preflight: str | None = None) -> Callable[[argparse._SubParsersAction], None]:
    """A subcommand running a flow: one option per flow parameter, an optional preflight that checks user input first."""

    def load():
        import importlib

        loaded = importlib.import_module(module)
        return getattr(loaded, flow_name), getattr(loaded, preflight) if preflight else None

    def run(args: argparse.Namespace) -> int:
        flow, check = load()
        kwargs = flow_arguments(args, flow.fn)
        if check is not None:
            check(kwargs)  # user mistakes end here with one sentence, before a flow run is created
        print(json.dumps(flow(**kwargs), indent=2))
        return 0

    def add(subparsers: argparse._SubParsersAction) -> None:
        flow, _ = load()
        parser = subparsers.add_parser(name, help=help_text, description=inspect.getdoc(flow.fn).split("\n\n")[0])
        add_flow_arguments(parser, flow.fn)
        parser.set_defaults(handler=run)

    return add


_add_filter = _flow_command(
    "filter", "flows.nsfw_filter", "nsfw_filter", "run the nsfw-filter flow: score every image, keep those below --score-threshold", "preflight"
)
_add_dedup = _flow_command(
    "dedup", "flows.dedup", "image_dedup", "run the image-dedup flow: near-duplicates from the cached embeddings (no CLIP run)"
)


def _add_review(subparsers: argparse._SubParsersAction) -> None:
    from tasks.review import DEFAULT_BLUR_ABOVE, DEFAULT_REVIEW_SAMPLES

    parser = subparsers.add_parser(
        "review",
        help="write an HTML review sheet of a filter run's scores for calibrating --score-threshold",
        description="Read a filter run's scores and input shards and write {output_path}/review/review.html: a score "
        "histogram with the threshold marked, then thumbnails sampled across score bands, denser around the threshold, "
        "each with key, shard, score and caption. Thumbnails of high-scoring images are blurred unless --no-blur.",
    )
    parser.add_argument("--output-path", required=True, help="the output_path of a finished filter run (local or object storage)")
    parser.add_argument("--n", type=int, default=DEFAULT_REVIEW_SAMPLES, help="samples to show (default: %(default)s)")
    parser.add_argument("--around", type=float, default=None, help="nsfw_score to sample densely around (default: the run's score_threshold)")
    parser.add_argument("--blur-above", type=float, default=DEFAULT_BLUR_ABOVE, help="blur thumbnails with nsfw_score >= this (default: %(default)s)")
    parser.add_argument("--no-blur", action="store_true", help="show every thumbnail unblurred (opt in to see explicit images)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed picks the same samples (default: %(default)s)")
    parser.set_defaults(handler=_run_review)


def _run_review(args: argparse.Namespace) -> int:
    from tasks.review import write_review_sheet

    sheet = write_review_sheet(
        args.output_path, n=args.n, around=args.around, blur_above=args.blur_above, blur=not args.no_blur, seed=args.seed
    )
    unavailable = sum(sample.thumbnail is None for sample in sheet.samples)
    print(f"{len(sheet.samples)} samples ({unavailable} without image) of {sheet.overview.scored} scored -> {sheet.sheet_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsfw-curator",
        description="Score WebDataset images with LAION's CLIP-based NSFW detector, filter them, and reuse the embeddings.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in ADD_SUBCOMMANDS:
        add(subparsers)
    return parser


ADD_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_filter, _add_dedup, _add_score_embeddings, _add_models, _add_review]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"nsfw-curator: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a failed run: say so in one line; Prefect has logged the details
        print(f"nsfw-curator: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
