"""Training-step benchmark: ms per optimiser step and tokens per second of llmcore's real `Trainer.train_step`.

    python bench/train_step.py [--steps N] [--json PATH]        (from the repository root)

Cases: (a) nanoGPT's README CPU recipe (specs/nanogpt_cpu.yaml: 4 layers, 4 heads, 128 wide, block 64, batch 12),
(b) nanoGPT's baby GPT on CPU (6 layers, 6 heads, 384 wide, block 256, batch 8; fewer steps), and where CUDA is
available (c) GPT-2 small (12 layers, 12 heads, 768 wide, block 1024, vocab 50304, bf16, torch.compile, batch 16)
with MFU. Each case builds a `Trainer` on real shards (a char tokenizer and shards built once in a temporary
directory from ../shared/data/tinyshakespeare.txt if present, else from the Python standard library's source),
runs warmup steps, then reports the median over the timed steps. Results go to bench/results/train_step.json.
Timings on a shared machine are noisy: compare medians of repeated runs, taken side by side.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmcore import distributed as D
from llmcore.config import DataConfig, FilesSource, ModelConfig, PythonStdlibSource, TokenizerConfig, TrainConfig
from llmcore.hardware import synchronize
from llmcore.io import atomic_write_json, read_json
from llmcore.shards import write_shards
from llmcore.tokenizer import train_tokenizer
from llmcore.train import Trainer, lr_at

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_CPU = REPO / "specs" / "nanogpt_cpu.yaml"


def cases(steps: int) -> list[dict]:
    """(name, ModelConfig, TrainConfig, timed steps, warmup steps, vocab override) for this machine."""
    from workflows.spec import load_spec  # the recipe is the spec's, so the two never drift apart

    spec = next(s for *_, s in load_spec(NANOGPT_CPU).runs if s.model.pos_encoding == "learned")  # nanoGPT's model
    cpu = dict(device="cpu", precision="fp32", compile=False)
    out = [
        dict(name="nanogpt-cpu 4x128 T=64 B=12", model=spec.model, train=spec.train, steps=steps, warmup=10),
        dict(
            name="baby-gpt 6x384 T=256 B=8 (cpu)",
            steps=max(5, steps // 10),
            warmup=3,
            model=ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
            train=TrainConfig(batch_size=8, beta2=0.99, **cpu),
        ),
    ]
    if torch.cuda.is_available():
        out.append(
            dict(
                name="gpt2-small 12x768 T=1024 B=16 bf16 compile",
                steps=steps,
                warmup=15,
                vocab=50304,
                model=ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
                train=TrainConfig(batch_size=16, lr=6e-4, device="cuda", precision="bf16", compile=True),
            )
        )
    return out


def build_shards(root: Path) -> tuple[Path, str]:
    """A char tokenizer and its shards under root; returns (shards dir, corpus description)."""
    if CORPUS.is_file():
        data, what = DataConfig(sources=[FilesSource(path=str(CORPUS), format="text")], split="tail"), CORPUS.name
        tok = TokenizerConfig(model_type="char", vocab_size=128)
    else:
        data = DataConfig(sources=[PythonStdlibSource(max_bytes=4_000_000)], split="document")
        tok = TokenizerConfig(model_type="char", vocab_size=512, byte_fallback=True, character_coverage=0.9995)
        what = "python stdlib source (4 MB)"
    train_tokenizer(data, tok, root / "tokenizer", seed=0)
    write_shards(data, root / "tokenizer" / "tokenizer.model", root / "shards", seed=0)
    return root / "shards", what


def with_vocab(shards: Path, vocab: int) -> Path:
    """The same shard files seen through a manifest that declares a larger vocabulary (model width only)."""
    view = shards.parent / f"shards-vocab{vocab}"
    view.mkdir(exist_ok=True)
    for f in shards.glob("*.bin"):
        (view / f.name).symlink_to(f)
    atomic_write_json(view / "manifest.json", {**read_json(shards / "manifest.json"), "vocab_size": vocab})
    return view


def bench_case(case: dict, shards: Path, out_dir: Path) -> dict:
    """Warm up, then time `steps` calls of Trainer.train_step (the training loop's own step)."""
    trainer = Trainer(case["model"], case["train"], shards, out_dir, seed=1337)
    times = []
    try:
        for i in range(case["warmup"] + case["steps"]):
            t0 = time.perf_counter()
            loss, _ = trainer.train_step(lr_at(i, trainer.cfg))
            loss.item()  # what the loop does at each logged step
            synchronize(trainer.device)
            if i >= case["warmup"]:
                times.append(time.perf_counter() - t0)
    finally:
        D.cleanup()
    sec = statistics.median(times)
    tok_s = trainer.tokens_per_step / sec
    return {
        "case": case["name"],
        "device": str(trainer.device),
        "params": trainer.model.num_params(),
        "tokens_per_step": trainer.tokens_per_step,
        "warmup_steps": case["warmup"],
        "timed_steps": len(times),
        "ms_per_step": 1000 * sec,
        "ms_per_step_min": 1000 * min(times),
        "tokens_per_sec": tok_s,
        "mfu": trainer.flops_per_token * tok_s / trainer.peak if trainer.peak else None,
        "final_loss": loss.item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps for the small cases (baby GPT: steps/10)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "train_step.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-") as tmp:
        shards, corpus = build_shards(Path(tmp))
        results = []
        for k, case in enumerate(cases(args.steps)):
            src = with_vocab(shards, case["vocab"]) if case.get("vocab") else shards
            results.append(bench_case(case, src, Path(tmp) / f"run{k}"))
            r = results[-1]
            print(
                f"{r['case']:<44} {r['ms_per_step']:9.2f} ms/step {r['tokens_per_sec']:11,.0f} tok/s"
                + (f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""),
                flush=True,
            )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "corpus": corpus,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, report)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
