"""`nsfw-curator` command line: each subcommand parses its arguments and calls a flow or a function.

Exit status: 0 success, 2 a mistake in the input (one sentence on stderr), 1 a failed run, 130 / 143 a run
stopped by SIGINT (Ctrl-C) / SIGTERM. A stopped run ends within seconds: background work stops at its
next batch (tasks/stop.py), Prefect's local API server (when no PREFECT_API_URL is set) is shut down, and
running the same command again completes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import BaseModel

from flows import use_prefect_defaults
from flows.parameters import REQUIRED, FlowSignature, read_flow_signature, without_range
from tasks.errors import UserError
from tasks.io.locations import default_model_dir, hold_url_credentials, nsfw_weights_path
from tasks.models.weights_present import refuse_missing_head, refuse_missing_weights
from tasks.stop import request_stop

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Flow parameters that hold storage URLs (which may carry `user:password@`).
URL_PARAMETERS = frozenset({"file_paths", "output_path", "cache_path", "filter_output_path", "clip_pretrained", "nsfw_weights"})
# After an interrupt, at most this long for Prefect to record the crash and shut down before the process ends itself.
EXIT_GRACE_S = 20.0

def _add_score_embeddings(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score CLIP image embeddings computed elsewhere (for example clip-retrieval's img_emb/*.npy) "
        "and write Parquet with `nsfw_score` (float32, null when not scored) and `error` added; other "
        "Parquet columns such as `key` are carried over."
    )
    parser.add_argument("--input", required=True, help="a .npy of shape [N, D], or Parquet with an `embedding` list column")
    parser.add_argument("--output", required=True, help="the Parquet file to write (local path or fsspec URL)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--nsfw-weights", help="an NSFW-head safetensors file")
    weights.add_argument("--model-dir", help="the model directory; the head for --clip-model is read from it")
    parser.add_argument("--clip-model", default="ViT-L-14", help="which CLIP model the embeddings come from (default: ViT-L-14)")
    parser.add_argument("--signals", default=None, help="signals to score besides nsfw, as the filter flow takes them (inline JSON, or a JSON/YAML file's path or URL)")
    parser.add_argument("--policy", default=None, help="with --signals: add `filtered_by`, the first rule of this policy that drops each row (inline JSON or a file)")
    parser.add_argument("--clip-pretrained", default="openai", help="for concepts signals: the CLIP checkpoint whose text tower encodes the concepts (default: openai)")
    parser.add_argument("--cache-path", default=None, help="for concepts signals: the embedding store that keeps their text features (default: as the filter flow)")
    parser.add_argument("--model-inference-batch-size", type=int, default=32, help="rows scored per batch (default: 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(handler=_run_score_embeddings)


def _run_score_embeddings(args: argparse.Namespace) -> int:
    weights = args.nsfw_weights or nsfw_weights_path(args.model_dir, args.clip_model)
    refuse_missing_head(str(weights))  # at once, before torch takes seconds to import
    import torch

    from tasks.models.nsfw import load_nsfw_head
    from tasks.filter.score_file import score_embedding_file

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu or run on a GPU machine.")
    head = load_nsfw_head(weights, device=device)
    signals = _score_file_signals(args, head.embedding_dim) if args.signals or args.policy else None
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        rows = score_embedding_file(
            args.input, args.output, head, batch_size=args.model_inference_batch_size, device=device, signals=signals, with_policy=args.policy is not None
        )
    for note in notes:
        print(f"nsfw-curator: note: {note.message}", file=sys.stderr)
    print(f"scored {rows} embeddings -> {args.output}")
    return 0


def _score_file_signals(args: argparse.Namespace, embedding_dim: int) -> Any:
    """The signals and policy of a `score-embeddings` call, planned as a filter run plans them (tasks/signals/plan.py)."""
    from tasks.io.locations import Location, default_cache_path, default_model_dir
    from tasks.models.clip_resolve import resolve_clip
    from tasks.signals.plan import parse_signals, plan_signals
    from tasks.store.entries import EmbeddingStore

    signals = args.signals or None
    needs_text = any(spec.kind == "concepts" for spec in parse_signals(signals, {}))
    clip_weights = resolve_clip(args.clip_model, args.clip_pretrained, args.model_dir or default_model_dir()) if needs_text else None
    store = EmbeddingStore(Location(args.cache_path or default_cache_path())) if needs_text else None
    policy = args.policy or None
    return plan_signals(signals, policy, 0.5, embedding_dim, {}, clip_weights, store)


def _add_models(parser: argparse.ArgumentParser) -> None:
    models = parser.add_subparsers(dest="models_command", required=True, metavar="{fetch,convert-laion,convert}")
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
    signal_convert = models.add_parser(
        "convert",
        help="convert published signal weights (aesthetic predictors, Q16 or violence prompts) to safetensors",
        description="Convert improved-aesthetic-predictor's or LAION aesthetic-predictor's .pth, Q16's prompts.p or "
        "clip-retrieval's violence .npy into the safetensors signal weights the pipeline loads. Pickles are never run.",
    )
    signal_convert.add_argument("source", help="the published weights file")
    signal_convert.add_argument("out", help="the safetensors file to write")
    signal_convert.add_argument("--kind", choices=["aesthetic", "prompts"], default=None, help="what the source must hold (default: found from the file)")
    signal_convert.add_argument("--scale", type=float, default=None, help="prompts: the softmax scale of the cosines (default: 100, as Q16)")
    signal_convert.add_argument("--positive-class", type=int, default=None, help="prompts: the class whose probability is the score (default: 1)")
    signal_convert.set_defaults(handler=_run_models_convert)


def _run_models_fetch(args: argparse.Namespace) -> int:
    from tasks.models.fetch import fetch_models

    for path in fetch_models(args.model_dir, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained):
        print(path)
    return 0


def _run_convert_laion(args: argparse.Namespace) -> int:
    from tasks.models.laion_convert import convert_laion_zip

    print(convert_laion_zip(args.zip, args.out))
    return 0


def _run_models_convert(args: argparse.Namespace) -> int:
    from tasks.signals.convert import convert_signal_weights

    kind = convert_signal_weights(args.source, args.out, args.kind, scale=args.scale, positive_class=args.positive_class)
    print(f"{kind} -> {args.out}")
    return 0


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def _is_structured(annotation: Any) -> bool:
    """A parameter holding pydantic models (the policy, the signals): one option taking JSON or a file's path."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_is_structured(argument) for argument in typing.get_args(annotation))


def add_flow_arguments(parser: argparse.ArgumentParser, signature: FlowSignature) -> None:
    """One `--kebab-case` option per flow parameter, typed and documented from the flow's signature and docstring."""
    for parameter in signature.parameters:
        annotation = parameter.annotation
        option = "--" + parameter.name.replace("_", "-")
        required = parameter.default is REQUIRED
        default = None if required else parameter.default
        help_text = parameter.doc
        if not required and default not in (None, False):
            help_text += f" (default: {' '.join(default) if isinstance(default, list) else default})"
        kwargs: dict[str, Any] = {"dest": parameter.name, "help": help_text, "required": required, "default": default}
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif _is_structured(annotation):
            kwargs["type"] = str
            kwargs["help"] = help_text + " (inline JSON, or a JSON/YAML file's path or URL)"
        elif _is_list(annotation):
            kwargs["nargs"] = "+"
        else:
            scalar = without_range(args[0]) if args else annotation
            kwargs["type"] = scalar if scalar in (int, float) else str
        parser.add_argument(option, **kwargs)


def flow_arguments(args: argparse.Namespace, signature: FlowSignature) -> dict[str, Any]:
    """The flow's keyword arguments from parsed options (a one-item list for `str | list[str]` becomes the str)."""
    values = {}
    for parameter in signature.parameters:
        value = getattr(args, parameter.name)
        annotation = parameter.annotation
        if isinstance(value, str) and _is_structured(annotation):
            pass  # inline JSON or a file's path: the run's plan reads either (tasks/signals/plan.py)
        elif isinstance(value, list) and len(value) == 1 and typing.get_origin(annotation) is typing.Union and str in typing.get_args(annotation):
            value = value[0]
        values[parameter.name] = value
    return values


@contextlib.contextmanager
def progress_not_task_states() -> Iterator[None]:
    """While a run goes on in this process, the terminal shows one updating progress line (flows/progress.py) instead of a state line per task run.

    Task runs' INFO lines still reach the Prefect API (the UI's logs); their warnings and errors still reach
    the terminal. `--verbose` keeps every line.
    """
    import logging

    from flows.progress import show_in_terminal

    def not_task_run_info(record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect.task_runs") and record.levelno < logging.WARNING)

    consoles = [handler for handler in logging.getLogger().handlers if type(handler).__name__ == "PrefectConsoleHandler"]
    for handler in consoles:
        handler.addFilter(not_task_run_info)
    show_in_terminal(sys.stderr)
    try:
        yield
    finally:
        show_in_terminal(None)
        for handler in consoles:
            handler.removeFilter(not_task_run_info)


class RunFailed(Exception):
    """A flow run was created and failed; its message is the cause's own sentence."""


def _flow_command(
    module: str, flow_name: str, preflight: str | None = None, early_check: Callable[[dict[str, Any]], None] | None = None
) -> Callable[[argparse.ArgumentParser], None]:
    """A subcommand running a flow: one option per flow parameter, an optional preflight that checks user input first.

    The options come from the flow's source (flows/parameters.py): Prefect and torch are imported only to run it.
    `early_check` gets the flow's keyword arguments before that import, for mistakes found without them.
    """

    def load():
        import importlib

        loaded = importlib.import_module(module)
        return getattr(loaded, flow_name), getattr(loaded, preflight) if preflight else None

    def run(args: argparse.Namespace) -> int:
        kwargs = flow_arguments(args, read_flow_signature(module, flow_name))
        # Credentials in URLs stay in this process: Prefect stores flow-run parameters, so they are taken out here
        # and the run's planning finds them again (tasks/io/locations.py).
        kwargs = {name: hold_url_credentials(value) if name in URL_PARAMETERS else value for name, value in kwargs.items()}
        if early_check is not None:
            early_check(kwargs)  # answers in a fraction of a second, before Prefect and torch take seconds to import
        flow, check = load()
        if check is not None:
            check(kwargs)  # user mistakes end here with one sentence, before a flow run is created
        try:
            with contextlib.nullcontext() if kwargs.get("verbose") else progress_not_task_states():
                outcome = flow(**kwargs)
        except UserError as exc:
            raise RunFailed(f"{type(exc).__name__}: {exc}") from exc  # a run exists and failed: exit status 1, not 2
        print(json.dumps(outcome, indent=2))
        return 0

    def add(parser: argparse.ArgumentParser) -> None:
        signature = read_flow_signature(module, flow_name)
        parser.description = signature.summary
        add_flow_arguments(parser, signature)
        parser.set_defaults(handler=run)

    return add


def _refuse_missing_filter_weights(kwargs: dict[str, Any]) -> None:
    refuse_missing_weights(kwargs["clip_model"], kwargs["clip_pretrained"], kwargs["model_dir"], kwargs["nsfw_weights"])


_add_filter = _flow_command("flows.nsfw_filter", "nsfw_filter", "preflight", _refuse_missing_filter_weights)
_add_dedup = _flow_command("flows.dedup", "image_dedup", "preflight")


def _add_review(parser: argparse.ArgumentParser) -> None:
    from tasks.review.sampling import DEFAULT_REVIEW_SAMPLES
    from tasks.review.sheet import DEFAULT_BLUR_ABOVE

    parser.description = (
        "Read a filter run's scores and input shards and write {output_path}/review/review.html: one signal's score "
        "histogram (nsfw unless --signal) with its threshold marked, then thumbnails sampled across its score bands, denser "
        "around the threshold, each with key, shard, scores, the rule that dropped it and caption. Thumbnails of images "
        "with a high nsfw_score are blurred unless --no-blur, whichever signal is reviewed."
    )
    parser.add_argument("--output-path", required=True, help="the output_path of a finished filter run (local or object storage)")
    parser.add_argument("--signal", default="nsfw", help="the signal to review: nsfw or one the run scored, as summary.json lists them (default: %(default)s)")
    parser.add_argument("--n", type=int, default=DEFAULT_REVIEW_SAMPLES, help="samples to show (default: %(default)s)")
    parser.add_argument(
        "--around",
        type=float,
        default=None,
        help="score of the reviewed signal to sample densely around (default: the policy's threshold on it; for nsfw the run's score_threshold)",
    )
    parser.add_argument("--blur-above", type=float, default=DEFAULT_BLUR_ABOVE, help="blur thumbnails with nsfw_score >= this (default: %(default)s)")
    parser.add_argument("--no-blur", action="store_true", help="show every thumbnail unblurred (opt in to see explicit images)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed picks the same samples (default: %(default)s)")
    parser.set_defaults(handler=_run_review)


def _run_review(args: argparse.Namespace) -> int:
    from tasks.io.locations import Location, resolve_url_credentials
    from tasks.review.sheet import write_review_sheet

    sheet = write_review_sheet(
        Location(*resolve_url_credentials(args.output_path)),
        n=args.n,
        around=args.around,
        blur_above=args.blur_above,
        blur=not args.no_blur,
        seed=args.seed,
        signal=args.signal,
    )
    unavailable = sum(sample.thumbnail is None for sample in sheet.samples)
    scored_by = "" if args.signal == "nsfw" else f" by {args.signal}"
    print(f"{len(sheet.samples)} samples ({unavailable} without image) of {sheet.overview.scored} scored{scored_by} -> {sheet.sheet_url}")
    return 0


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve both flows from this process on one GPU host, no work pool: the deployments nsfw-filter/nsfw-filter-serve "
        "and image-dedup/image-dedup-serve appear on the server PREFECT_API_URL names, their runs (UI, API, schedules, "
        "and image-dedup after every completed filter run) run here, one filter run at a time. Ctrl-C stops serving."
    )
    parser.add_argument("--limit", type=int, default=None, help="flow runs at once in this process, both flows together (default: no limit)")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_flows

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {args.limit}).")
    serve_flows(limit=args.limit)
    return 0


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; only the subcommand `argv` names gets its options (the others are listed by name and help)."""
    parser = argparse.ArgumentParser(
        prog="nsfw-curator",
        description="Score WebDataset images with LAION's CLIP-based NSFW detector, filter them, and reuse the embeddings.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    named = _subcommand_named(sys.argv[1:] if argv is None else argv)
    for name, (help_text, add) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == named:
            add(subparser)
    return parser


def _subcommand_named(argv: Sequence[str]) -> str | None:
    """The subcommand on the command line (its first word that is not an option); None for `--help` alone."""
    return next((word for word in argv if not word.startswith("-")), None)


# name -> (help, adds its options): `nsfw-curator --help` lists them without importing what they run.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "filter": ("run the nsfw-filter flow: score every image, keep those below --score-threshold", _add_filter),
    "dedup": ("run the image-dedup flow: near-duplicates from the cached embeddings (no CLIP run)", _add_dedup),
    "score-embeddings": ("score CLIP embeddings you already have (.npy or Parquet) with the LAION NSFW head", _add_score_embeddings),
    "models": ("get or convert model weights", _add_models),
    "review": ("write an HTML review sheet of a filter run's scores for calibrating --score-threshold", _add_review),
    "serve": ("serve both flows as deployments from this GPU host (no work pool); runs start from the UI or API", _add_serve),
}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run unwinds like after Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum: int, frame: object) -> None:
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_DFL)  # a second signal ends the process at once
    raise Interrupted(signum)


def _child_pids() -> list[int]:
    """This process's child processes (Linux /proc; empty elsewhere)."""
    children: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            children.extend(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return children


class StopSignalWatch:
    """Sees SIGINT/SIGTERM even while Prefect's own SIGTERM handler is installed (through the signal wakeup fd).

    On the first one: background work is asked to stop (tasks/stop.py) and, for the command-line process, an
    exit deadline starts: a shutdown that hangs (Prefect retrying a local API server that the same Ctrl-C
    ended) is cut short after EXIT_GRACE_S, child processes are terminated, and the exit status says which
    signal stopped the run.
    """

    def __init__(self, exit_deadline: bool) -> None:
        self.signum: int | None = None
        self._exit_deadline = exit_deadline
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_handlers = {stop_signal: signal.signal(stop_signal, _on_stop_signal) for stop_signal in STOP_SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                received = self._read.recv(64)
            except OSError:
                return
            if not received:
                return
            stop_signals = [signum for signum in received if signum in STOP_SIGNALS]
            if stop_signals and self.signum is None:
                self.signum = stop_signals[0]
                request_stop()
                if self._exit_deadline:
                    self._end_by_deadline(128 + self.signum)

    @staticmethod
    def _end_by_deadline(exit_status: int) -> None:
        time.sleep(EXIT_GRACE_S)
        for pid in _child_pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
        print(f"nsfw-curator: stopped by {signal.Signals(exit_status - 128).name}; shutdown took too long, ended it.", file=sys.stderr)
        os._exit(exit_status)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for stop_signal, handler in self._previous_handlers.items():
            signal.signal(stop_signal, handler)
        self._write.close()
        self._read.close()


def _interrupting_signal(exc: BaseException, watch: StopSignalWatch | None) -> int | None:
    """The signal that stopped the run, if one did (whatever exception the unwinding ended with)."""
    if isinstance(exc, Interrupted):
        return exc.signum
    if watch is not None and watch.signum is not None:
        return watch.signum
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal):
        return int(exc.signal)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    use_prefect_defaults()
    args = build_parser(argv).parse_args(argv)
    # Signals are ours only in the main thread; the exit deadline only for the command-line process itself.
    watch = StopSignalWatch(exit_deadline=argv is None) if threading.current_thread() is threading.main_thread() else None
    try:
        return int(args.handler(args) or 0)
    except BaseException as exc:
        signum = _interrupting_signal(exc, watch)
        if signum is not None:
            request_stop()
            if args.command == "serve":
                print(f"nsfw-curator: stopped serving by {signal.Signals(signum).name}.", file=sys.stderr)
            else:
                print(f"nsfw-curator: stopped by {signal.Signals(signum).name}; finished work is kept, run the same command again to complete it.", file=sys.stderr)
            return 128 + signum
        if isinstance(exc, UserError):
            print(f"nsfw-curator: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, Exception):
            # A failed run: say so in one line; Prefect has logged the details.
            print(f"nsfw-curator: the run failed: {exc if isinstance(exc, RunFailed) else f'{type(exc).__name__}: {exc}'}", file=sys.stderr)
            return 1
        raise
    finally:
        if watch is not None:
            watch.close()


if __name__ == "__main__":
    sys.exit(main())
