"""Run every fuzz target (or those named) for N seconds each, one process per target.

    .venv/bin/python tests/fuzz/run_fuzz.py --seconds 60 [TARGET ...]

Exits non-zero if any target found a failing input; libFuzzer saves it as crash-<sha1> in
``--artifacts`` (default: tests/fuzz/artifacts), and the corpus it grew in tests/fuzz/corpus/TARGET
is reused by the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from seeds import SEEDS

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "fuzz_parsers.py"
TARGETS = ["frames", "replies", "dns", "nflog", "kmsg", "policy", "config", "sniff"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target [60]")
    parser.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    args = parser.parse_args()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    unknown = [target for target in args.targets if target not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    failed = []
    for target in args.targets or TARGETS:
        corpus = HERE / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for seed in SEEDS.get(target, []):
                (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)  # noqa: S324
        print(f"== {target}: {args.seconds} s", flush=True)
        result = subprocess.run(
            [
                sys.executable,
                str(HARNESS),
                target,
                f"-max_total_time={args.seconds}",
                f"-artifact_prefix={args.artifacts}/{target}-",
                "-print_final_stats=1",
                str(corpus),
            ],
            check=False,
        )
        if result.returncode != 0:
            failed.append(target)
    print("failed: " + (", ".join(failed) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
