"""Engine ways against the ceiling, measured side by side so that machine noise hits both alike.

On a shared machine the speed of the CPU and of its memory drifts by 10-20% between minutes, more than
the 5% a ratio target asks to resolve. Here two processes, one torch thread each, run the same ways at
the same time in opposite orders (process A: ceiling, merged, ...; process B: merged, ceiling, ...), so
each way is always measured while the other one shares the machine. Each pair of runs at the same time
gives one ratio; the mean over pairs is the figure.

    python bench/paired_bench.py --shape qwen0.5b-4l --requests 256 --rounds 2 --ways ceiling merged
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def run_ways(shape: str, root: Path, n: int, rounds: int, ways: list[str], max_batch_size: int) -> None:
    """One process's share: every way in the given order, ``rounds`` times; one JSON line per run."""
    import torch

    from bench.engine_bench import build_shape, prepare, run_engine

    torch.set_num_threads(1)
    setup = prepare(build_shape(root, shape), n=n, max_batch_size=max_batch_size, max_batch_tokens=16384)
    for round_ in range(rounds):
        for way in ways:
            engine, reqs, weights = setup.way(way)
            m = run_engine(engine, reqs, weights=weights, way=way)
            print(json.dumps({"round": round_, "way": way, "tokens_per_s": m.tokens_per_s}), flush=True)


def main() -> int:
    from bench.engine_bench import SHAPES, WAYS, build_shape

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen0.5b-4l", choices=list(SHAPES))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ways", nargs="+", default=["ceiling", "merged"], choices=list(WAYS))
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lorabatch-bench")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: the ways one process runs, in order
    args = ap.parse_args()
    if args.child:
        run_ways(args.shape, args.root, args.requests, args.rounds, args.child, args.max_batch_size)
        return 0
    if args.ways.count("ceiling") != 1 or len(args.ways) != 2:
        ap.error("--ways takes the ceiling and one other way, e.g. --ways ceiling merged")
    common = [sys.executable, __file__, "--shape", args.shape, "--requests", str(args.requests), "--rounds",
              str(args.rounds), "--max-batch-size", str(args.max_batch_size), "--root", str(args.root)]
    build_shape(args.root, args.shape)  # once, before two processes would race to build it
    children = [subprocess.Popen([*common, "--child", *order], stdout=subprocess.PIPE, text=True)
                for order in (args.ways, args.ways[::-1])]
    runs = [[json.loads(line) for line in child.stdout] for child in children]
    if any(child.wait() for child in children):
        raise SystemExit("a benchmark process failed; its error is above")
    other = next(w for w in args.ways if w != "ceiling")
    print(f"## {args.shape}: {other} against the ceiling, {args.requests} requests, two processes of 1 thread")
    print("| pair | ceiling tokens/s | " + other + " tokens/s | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for a, b in zip(*runs):  # the i-th runs of the two processes overlap in time
        by_way = {r["way"]: r["tokens_per_s"] for r in (a, b)}
        ratio = by_way[other] / by_way["ceiling"]
        ratios.append(ratio)
        print(f"| round {a['round']}, {a['way']} beside {b['way']} | {by_way['ceiling']:.1f} | {by_way[other]:.1f} | {ratio:.3f} |")
    print(f"\nmean ratio over {len(ratios)} pairs: {sum(ratios) / len(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
