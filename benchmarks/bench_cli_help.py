"""How long `nsfw-curator --help` and `nsfw-curator filter --help` take, against importing the flow module.

    python benchmarks/bench_cli_help.py [--repeats 5]

Each command is a fresh interpreter, run `--repeats` times; the median wall time is printed. The
baseline, `import flows.nsfw_filter` (Prefect, torch, open_clip), is what building the options needed
before they were read from the flows' source.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "baseline: import flows.nsfw_filter": ["-c", "import flows.nsfw_filter"],
    "nsfw-curator --help": ["-c", "import sys; from flows.cli import main; sys.exit(main(['--help']))"],
    "nsfw-curator filter --help": ["-c", "import sys; from flows.cli import main; sys.exit(main(['filter', '--help']))"],
}


def median_seconds(arguments: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *arguments], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {name: median_seconds(arguments, args.repeats) for name, arguments in COMMANDS.items()}
    baseline = results["baseline: import flows.nsfw_filter"]
    for name, seconds in results.items():
        print(f"{name:40s} {seconds:6.2f} s   {seconds / baseline:5.2f}x baseline")


if __name__ == "__main__":
    main()
