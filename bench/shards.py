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
Pretrained tokenizer (issue 14: "sharding encodes with it ... at least as fast as today's SentencePiece path"): a
byte-level BPE ``tokenizer.json`` (GPT-2's kind) trained with the ``tokenizers`` library to the same vocabulary
size on the same 8 MB, saved with a tokenizer_config.json naming ``<|endoftext|>`` as a hub folder holds it, and
imported as the tokenizer stage does (``llmcore.tokenizer.import_tokenizer``). ``write_shards`` with it runs on the
2x corpus with 1 and 2 processes, between SentencePiece's 1-process and 2-process cases of that corpus (order
SP-1, HF-1, ..., HF-2, SP-2, so a drifting load hits both sides alike); figures: its MB/s and its
throughput over SentencePiece's with the same process count (target >= 1.0x). Batches of this kind are encoded by
tiktoken (``llmcore.tokenizer.TiktokenBPE``); one more 1-process case encodes with the ``tokenizers`` library
alone (its ``encode_batch_fast``, its own threads on: 2 cores here) for comparison, and the shards the two write
must be byte-identical (sha256 of every shard file): the same ids on every document of the corpus.
Results: bench/results/shards.json.
"""

from __future__ import annotations

import hashlib
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
HF_RATIO_TARGET = 1.0  # the pretrained tokenizer's MB/s over SentencePiece's
HF_WORKERS = (1, 2)
SP, HF = "sentencepiece", "huggingface"
#: The pretrained tokenizer again with the tokenizers library's own threads off in every process (it reads the
#: variable at each call; unset, each process's encode_batch spreads over every core)
HF_LIBRARY = "huggingface-tokenizers-only"


def run_case(args) -> int:
    """In the case subprocess: write the shards, print one JSON line of what it measured itself."""
    import llmcore.tokenizer
    from llmcore.shards import write_shards

    if args.tokenizers_only:  # in-process encoding only (workers 1): the pool's spawned workers would not see this
        llmcore.tokenizer.TiktokenBPE.of = lambda spec: None
    data = stdlib_data(args.repeats, args.max_bytes, num_workers=args.workers)
    t0 = time.perf_counter()
    manifest = write_shards(data, args.tokenizer, args.out, seed=0)
    seconds = time.perf_counter() - t0
    splits = manifest["splits"].values()
    digests = []  # read in chunks: the peak RSS figures cover this process
    for shard in sorted(Path(args.out).glob("*.bin")):
        with shard.open("rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "bytes": sum(s["bytes"] for s in splits),
                "tokens": sum(s["tokens"] for s in splits),
                "encoder": manifest["encoder"],
                "shards_sha256": digests,
                # ru_maxrss is in KiB on Linux; for children, the largest single encoder process that has exited
                "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            }
        )
    )
    return 0


def measure(
    tmp: Path,
    tokenizer: Path,
    size: str,
    repeats: int,
    max_bytes: int | None,
    workers: int,
    kind: str = SP,
) -> dict:
    out, log = tmp / f"shards-{kind}-{size}-{workers}", tmp / f"shards-{kind}-{size}-{workers}.log"
    cmd = (
        [
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
        ]
        + (["--max-bytes", str(max_bytes)] if max_bytes else [])
        + (["--tokenizers-only"] if kind == HF_LIBRARY else [])
    )
    ran = run_logged(cmd, log, rss=True)
    row = json.loads(log.read_text().strip().splitlines()[-1])
    row.update(
        tokenizer=kind,
        size=size,
        workers=workers,
        peak_rss_tree=ran.peak_rss,
        subprocess_seconds=ran.seconds,
        mb_per_s=row["bytes"] / 1e6 / row["seconds"],
        tokens_per_s=row["tokens"] / row["seconds"],
    )
    print(
        f"    {kind}, {size} corpus ({row['bytes'] / 1e6:.1f} MB), {workers} process(es): {row['seconds']:.1f} s, "
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


def train_byte_bpe(folder: Path, sample_bytes: int, vocab_size: int, pad_to: int | None = None) -> Path:
    """A Hugging Face tokenizer folder as the hub holds GPT-2's: a byte-level BPE ``tokenizer.json`` trained with
    the ``tokenizers`` library on the corpus's first ``sample_bytes``, ``<|endoftext|>`` its only special token
    (id 0), named as eos and bos in tokenizer_config.json. ``pad_to``: fill the vocabulary up to this size with
    unused special tokens where the sample has too few merges (a model's embedding has a fixed size)."""
    import tokenizers

    from llmcore.corpus import iter_documents

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(stdlib_data(max_bytes=sample_bytes)), trainer)
    if pad_to is not None and tok.get_vocab_size() < pad_to:
        tok.add_special_tokens([f"<|unused{i}|>" for i in range(pad_to - tok.get_vocab_size())])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def import_pretrained_tokenizer(folder: Path, stage_dir: Path, expected_vocab: int | None = None) -> Path:
    """The tokenizer stage of a spec with ``tokenizer: {type: pretrained, path: folder}``: its directory."""
    from llmcore.config import TokenizerConfig
    from llmcore.tokenizer import import_tokenizer

    import_tokenizer(TokenizerConfig(type="pretrained", path=str(folder)), stage_dir, expected_vocab)
    return stage_dir


def main(argv: list[str] | None = None) -> int:
    p = parser("shards", __doc__)
    p.add_argument("--case", action="store_true", help=argparse_hidden())
    p.add_argument("--repeats", type=int, default=1, help=argparse_hidden())
    p.add_argument("--max-bytes", type=int, default=None, help=argparse_hidden())
    p.add_argument("--workers", type=int, default=1, help=argparse_hidden())
    p.add_argument("--tokenizer", type=Path, help=argparse_hidden())
    p.add_argument("--out", type=Path, help=argparse_hidden())
    p.add_argument("--tokenizers-only", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.case:
        return run_case(args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # (label, repeats, max_bytes) of the small and the large corpus
    sizes = [("1x", 1, 2_000_000), ("2x", 1, 4_000_000)] if args.quick else [("1x", 1, None), ("2x", 2, None)]
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-shards-") as tmp:
        tmp = Path(tmp)
        sample = 1_000_000 if args.quick else 8_000_000
        tokenizer = train_quickstart_tokenizer(tmp, sample)
        hf_folder = train_byte_bpe(tmp / "hf-folder", sample, QUICKSTART_TOKENIZER["vocab_size"])
        hf_tokenizer = import_pretrained_tokenizer(hf_folder, tmp / "hf-tok")
        tokenizers = {SP: tokenizer, HF: hf_tokenizer, HF_LIBRARY: hf_tokenizer}
        # large corpus first (the throughput figures; each pretrained-tokenizer case next to SentencePiece's with
        # the same process count, in the order A B B A so a drifting load hits both alike), then the small one
        large = [(SP, 1), (HF, 1), (HF_LIBRARY, 1), (HF, 2), (SP, 2), (SP, cores)]
        cases = [(sizes[1], kind, w) for kind, w in dict.fromkeys(large)]
        cases += [(sizes[0], SP, w) for w in dict.fromkeys([cores, 1])]
        rows = []
        for (size, repeats, max_bytes), kind, workers in cases:
            rows.append(measure(tmp, tokenizers[kind], size, repeats, max_bytes, workers, kind))
    return report(args, rows, cores, sizes)


def report(args, rows: list[dict], cores: int, sizes: list) -> int:
    get = {(r["size"], r["workers"]): r for r in rows if r["tokenizer"] == SP}
    hf = {(r["size"], r["workers"]): r for r in rows if r["tokenizer"] == HF}
    library = next(r for r in rows if r["tokenizer"] == HF_LIBRARY)
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
    for workers in HF_WORKERS:
        sp_row, hf_row = get[(large, workers)], hf[(large, workers)]
        ratio = hf_row["mb_per_s"] / sp_row["mb_per_s"]
        procs = f"{workers} process{'es' if workers > 1 else ''}"
        figures += [
            figure(f"encode {large} corpus, SentencePiece BPE 2048, {procs}", sp_row["mb_per_s"], "MB/s"),
            figure(f"encode {large} corpus, HF byte-level BPE 2048, {procs}", hf_row["mb_per_s"], "MB/s"),
            figure(f"  HF / SentencePiece, {procs}", ratio, "x", f">= {HF_RATIO_TARGET:g}x SentencePiece",
                   None if args.quick else ratio >= HF_RATIO_TARGET),
        ]  # fmt: skip
    same = library["shards_sha256"] == hf[(large, 1)]["shards_sha256"] == hf[(large, cores)]["shards_sha256"]
    figures += [
        figure("  HF with the tokenizers library alone (its threads: every core), 1 process", library["mb_per_s"],
               "MB/s"),
        figure("  tiktoken's shards equal the tokenizers library's (sha256)", float(same), "", "1 (identical)",
               same),
    ]  # fmt: skip
    details = {
        "cores": cores,
        "corpus_bytes": {s: corpus_bytes(stdlib_data(r, m)) for s, r, m in sizes},
        "tokenizer": QUICKSTART_TOKENIZER,
        "pretrained_tokenizer": {
            "kind": "byte-level BPE tokenizer.json (tokenizers library), <|endoftext|> as eos",
            "vocab_size": QUICKSTART_TOKENIZER["vocab_size"],
            "tokens_per_byte": hf[(large, 1)]["tokens"] / hf[(large, 1)]["bytes"],
            "sentencepiece_tokens_per_byte": get[(large, 1)]["tokens"] / get[(large, 1)]["bytes"],
            "encoder": hf[(large, 1)]["encoder"],
        },
        "cases": rows,
    }
    write_report("shards", args, figures, details)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
