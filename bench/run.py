"""The benchmark, one command: `python bench/run.py` (about 15-25 minutes on a 2-core CPU).

For the demo model and a Qwen2.5-0.5B-shaped model cut to 4 layers (random weights), on one
workload (256 requests over 4 adapters and base, prompts of 8-256 tokens, 64 new tokens), it prints
tokens/s for: one prompt at a time with plain PEFT; the base model alone in equal batches (the
ceiling); the engine in each weights mode; lorabatch end to end; and 200 jobs of 2 requests
against one job of 400. Then the million-line submit (bench/scale_bench.py). Tables go to stdout
as Markdown, ready for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    from bench.e2e_bench import bench_end_to_end, print_e2e
    from bench.engine_bench import (
        SHAPES,
        bench_shape,
        build_shape,
        load_model,
        make_workload,
        print_table,
    )
    from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
    from lorabatch.schemas.settings import BASE_ADAPTER

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen0.5b-4l", "demo"], choices=list(SHAPES))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--one-at-a-time", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each way, interleaved; the best counts")
    ap.add_argument("--scale-lines", type=int, default=1_000_000, help="0 skips the submit benchmark")
    ap.add_argument("--models", type=Path, default=HERE / "out" / "models")
    args = ap.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"{platform.platform()}")
    for shape in args.shapes:
        root = build_shape(args.models, shape)
        measurements = bench_shape(root, n=args.requests, one_at_a_time=args.one_at_a_time, rounds=args.rounds,
                                   max_batch_size=32, max_batch_tokens=16384)
        print_table(shape, measurements)
        _, tokenizer = load_model(root / DEMO_MODEL_DIR)
        requests = make_workload(tokenizer, n=args.requests, adapters=[BASE_ADAPTER, *DEMO_ADAPTERS])
        print_e2e(shape, bench_end_to_end(root, requests, max_batch_size=32, max_batch_tokens=16384,
                                          rounds=args.rounds))
        sys.stdout.flush()
    if args.scale_lines:
        print("\n## submit at scale")
        sys.stdout.flush()
        subprocess.run([sys.executable, str(HERE / "scale_bench.py"), "--lines", str(args.scale_lines)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
