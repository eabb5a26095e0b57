"""Shards benchmark: encoding throughput (MB/s, tokens/s) with 1 process and with every core, and peak memory
(RSS of the whole process tree) at two corpus sizes.

    python bench/shards.py [--quick] [--json PATH]        (from the repository root)

Corpus: the Python standard library's source with its tests (about 30 MB here), once ("1x") and twice in a row
("2x", >= 50 MB); --quick uses its first 2 and 4 MB. Tokenizer: the quickstart's (BPE, 2048 pieces, byte
fallback) trained once on the first 8 MB. Each case runs ``write_shards`` (stream, encode, write, sha256 every
shard: the whole shards stage) in a fresh subprocess with ``data.num_workers`` = 1 or the core count, while this
process samples the summed RSS of that subprocess and its encoder processes every 20 ms. Figures: throughput and
speed-up on the 2x corpus (target >= 1.7x from 1 to 2 processes), and peak RSS at 2x over peak RSS at 1x
(target: memory independent of corpus size, taken as growing by at most 10% when the corpus doubles).
Results: bench/results/shards.json.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import corpus_bytes, figure, parser, ratio_pct, run_logged, stdlib_data, write_report

SPEEDUP_TARGET = 1.7
MEMORY_GROWTH_TARGET_PCT = 10.0
QUICKSTART_TOKENIZER = dict(model_type="bpe", vocab_size=2048, byte_fallback=True)


def run_case(args) -> int:
    """In the case subprocess: write the shards, print one JSON line of what it measured itself."""
    from llmcore.shards import write_shards

    data = stdlib_data(args.repeats, args.max_bytes, num_workers=args.workers)
    t0 = time.perf_counter()
    manifest = write_shards(data, args.tokenizer, args.out, seed=0)
    seconds = time.perf_counter() - t0
    splits = manifest["splits"].values()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": sum(s["bytes"] for s in splits),
                "tokens": sum(s["tokens"] for s in splits),
                # ru_maxrss is in KiB on Linux; for children, the largest single encoder process that has exited
                "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            }
        )
    )
    return 0


def measure(tmp: Path, tokenizer: Path, size: str, repeats: int, max_bytes: int | None, workers: int) -> dict:
    out, log = tmp / f"shards-{size}-{workers}", tmp / f"shards-{size}-{workers}.log"
    cmd = [
        sys.executable,
        __file__,
        "--case",
        "--repeats",
        str(repeats),
        "--workers",
        str(workers),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
    ] + (["--max-bytes", str(max_bytes)] if max_bytes else [])
    ran = run_logged(cmd, log, rss=True)
    row = json.loads(log.read_text().strip().splitlines()[-1])
    row.update(
        size=size,
        workers=workers,
        peak_rss_tree=ran.peak_rss,
        subprocess_seconds=ran.seconds,
        mb_per_s=row["bytes"] / 1e6 / row["seconds"],
        tokens_per_s=row["tokens"] / row["seconds"],
    )
    print(
        f"    {size} corpus ({row['bytes'] / 1e6:.1f} MB), {workers} process(es): {row['seconds']:.1f} s, "
        f"{row['mb_per_s']:.2f} MB/s, {row['tokens_per_s']:,.0f} tokens/s, peak RSS {ran.peak_rss / 2**20:.0f} MiB",
        flush=True,
    )
    for f in out.glob("*.bin"):  # keep /tmp small between cases
        f.unlink()
    return row


def train_quickstart_tokenizer(tmp: Path, sample_bytes: int) -> Path:
    from llmcore.config import TokenizerConfig
    from llmcore.tokenizer import train_tokenizer

    train_tokenizer(stdlib_data(max_bytes=sample_bytes), TokenizerConfig(**QUICKSTART_TOKENIZER), tmp / "tok", seed=0)
    return tmp / "tok" / "tokenizer.model"


def main(argv: list[str] | None = None) -> int:
    p = parser("shards", __doc__)
    p.add_argument("--case", action="store_true", help=argparse_hidden())
    p.add_argument("--repeats", type=int, default=1, help=argparse_hidden())
    p.add_argument("--max-bytes", type=int, default=None, help=argparse_hidden())
    p.add_argument("--workers", type=int, default=1, help=argparse_hidden())
    p.add_argument("--tokenizer", type=Path, help=argparse_hidden())
    p.add_argument("--out", type=Path, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.case:
        return run_case(args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # (label, repeats, max_bytes) of the small and the large corpus
    sizes = [("1x", 1, 2_000_000), ("2x", 1, 4_000_000)] if args.quick else [("1x", 1, None), ("2x", 2, None)]
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-shards-") as tmp:
        tmp = Path(tmp)
        tokenizer = train_quickstart_tokenizer(tmp, 1_000_000 if args.quick else 8_000_000)
        rows = []
        # large corpus first (the throughput figures), alternating the process count's order between sizes
        for (size, repeats, max_bytes), order in zip(reversed(sizes), ([1, cores], [cores, 1])):
            for workers in order:
                rows.append(measure(tmp, tokenizer, size, repeats, max_bytes, workers))
    return report(args, rows, cores, sizes)


def report(args, rows: list[dict], cores: int, sizes: list) -> int:
    get = {(r["size"], r["workers"]): r for r in rows}
    small, large = sizes[0][0], sizes[1][0]
    one, many = get[(large, 1)], get[(large, cores)]
    speedup = one["seconds"] / many["seconds"]
    figures = [
        figure(f"encode {large} corpus ({one['bytes'] / 1e6:.0f} MB), 1 process", one["mb_per_s"], "MB/s"),
        figure(f"encode {large} corpus, {cores} processes", many["mb_per_s"], "MB/s"),
        figure("  tokens/s, 1 process", one["tokens_per_s"], "tok/s"),
        figure(f"  tokens/s, {cores} processes", many["tokens_per_s"], "tok/s"),
        figure(
            f"speed-up 1 -> {cores} processes",
            speedup,
            "x",
            f">= {SPEEDUP_TARGET}x",
            speedup >= SPEEDUP_TARGET if cores >= 2 and not args.quick else None,
        ),
    ]
    for workers in (1, cores):
        lo, hi = get[(small, workers)]["peak_rss_tree"], get[(large, workers)]["peak_rss_tree"]
        growth = ratio_pct(hi, lo)
        figures += [
            figure(f"peak RSS (process tree), {workers} process(es), {small} corpus", lo / 2**20, "MiB"),
            figure(f"peak RSS (process tree), {workers} process(es), {large} corpus", hi / 2**20, "MiB"),
            figure(
                f"  growth from {small} to {large} corpus",
                growth,
                "%",
                f"<= {MEMORY_GROWTH_TARGET_PCT:g}%",
                growth <= MEMORY_GROWTH_TARGET_PCT,
            ),
        ]
    details = {
        "cores": cores,
        "corpus_bytes": {s: corpus_bytes(stdlib_data(r, m)) for s, r, m in sizes},
        "tokenizer": QUICKSTART_TOKENIZER,
        "cases": rows,
    }
    write_report("shards", args, figures, details)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
