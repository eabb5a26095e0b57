"""Tokenizer-training benchmark: seconds to train the quickstart's tokenizer against corpus size, sampling on.

    python bench/tokenizer.py [--quick] [--sample-lines N] [--json PATH]        (from the repository root)

Corpus: the first 4, 8, 16 MB and all (about 30 MB) of the Python standard library's source with its tests
(--quick: 1 and 2 MB). Tokenizer: the quickstart's (BPE, 2048 pieces, byte fallback, every core) with
``tokenizer.input_sentence_size`` = 100,000 lines (--quick: 20,000), so SentencePiece trains on a shuffled
sample of that many lines whatever the corpus size. Each size is timed with ``train_tokenizer`` (the whole
tokenizer stage: stream the corpus, sample, train, write the model), and separately the time to stream the
corpus as training lines alone, so the part that still grows with the corpus is visible. No target in the
issue: the figure to watch is how much slower 2x the corpus is. Results: bench/results/tokenizer.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import corpus_bytes, figure, parser, stdlib_data, write_report
from shards import QUICKSTART_TOKENIZER

MB = 1_000_000


def stream_seconds(data, cfg) -> tuple[float, int]:
    """Seconds to read the corpus as SentencePiece training lines (no training), and how many lines."""
    from llmcore.tokenizer import _TrainingLines

    t0 = time.perf_counter()
    lines = sum(1 for _ in _TrainingLines(data, cfg.max_training_bytes))
    return time.perf_counter() - t0, lines


def main(argv: list[str] | None = None) -> int:
    from llmcore.config import TokenizerConfig
    from llmcore.tokenizer import train_tokenizer

    p = parser("tokenizer", __doc__)
    p.add_argument("--sample-lines", type=int, default=None, help="input_sentence_size (default 100,000)")
    args = p.parse_args(argv)
    sample = args.sample_lines or (20_000 if args.quick else 100_000)
    sizes = [1 * MB, 2 * MB] if args.quick else [4 * MB, 8 * MB, 16 * MB, None]
    cfg = TokenizerConfig(**QUICKSTART_TOKENIZER, input_sentence_size=sample)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-tok-") as tmp:
        for i, size in enumerate(sizes):
            data = stdlib_data(max_bytes=size)
            read_s, lines = stream_seconds(data, cfg)
            t0 = time.perf_counter()
            stats = train_tokenizer(data, cfg, Path(tmp) / f"tok{i}", seed=0)
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "corpus_bytes": corpus_bytes(data),
                    "lines": lines,
                    "seconds": seconds,
                    "stream_seconds": read_s,
                    "vocab_size": stats["vocab_size"],
                }
            )
            print(
                f"    {rows[-1]['corpus_bytes'] / MB:5.1f} MB, {lines:,} lines: {seconds:.1f} s "
                f"(streaming the lines alone {read_s:.1f} s)",
                flush=True,
            )
    first, last = rows[0], rows[-1]
    figures = [
        figure(f"train on {r['corpus_bytes'] / MB:.1f} MB ({r['lines']:,} lines, sample {sample:,})", r["seconds"], "s")
        for r in rows
    ]
    figures += [
        figure(
            f"time ratio {last['corpus_bytes'] / MB:.0f} MB / {first['corpus_bytes'] / MB:.0f} MB "
            f"(corpus ratio {last['corpus_bytes'] / first['corpus_bytes']:.1f}x)",
            last["seconds"] / first["seconds"],
            "x",
        ),
        figure(
            f"streaming share of the time on {last['corpus_bytes'] / MB:.0f} MB",
            100 * last["stream_seconds"] / last["seconds"],
            "%",
        ),
    ]
    write_report(
        "tokenizer", args, figures, {"input_sentence_size": sample, "tokenizer": QUICKSTART_TOKENIZER, "sizes": rows}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
