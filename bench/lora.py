"""LoRA against full fine-tuning (issue 24): tokens/s and per-rank memory of the 124M GPT-2 on this CPU.

    python bench/lora.py [--quick] [--json PATH]        (from the repository root)

No GPT-2 files are downloaded: as bench/pretrained.py, the folder is ``transformers.GPT2Config()`` (12 layers, 768
wide, 1024 positions, vocabulary 50257) with random weights written by ``save_pretrained``. Each case runs in a
process of its own (so its peak RSS is its own): ``llmcore.hf.load_pretrained`` (block size cropped to 256, dropout
0), then for LoRA ``llmcore.lora.apply_lora`` with litgpt's defaults (r 8, alpha 16, dropout 0.05, attn.q and attn.v
of every block), AdamW as the trainer builds it (``GPT.configure_optimizer``: the trainable parameters only), fp32,
batches of 1 x 256 random tokens; 2 warmup steps, then the median of 5 timed steps (forward, backward, clip, AdamW
step). Memory, two measures: torch-tracked model state after a step (``llmcore.parallel.state_bytes``: parameter,
gradient and AdamW storage, each counted once), and the process's peak resident set (``ru_maxrss``: everything,
activations, the Python interpreter and torch's libraries included). ``--quick``: a 2-layer, 128-wide GPT-2.
Results: bench/results/lora.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import figure, parser, write_report

WARMUP, TIMED, BLOCK = 2, 5, 256


def build_folder(folder: Path, quick: bool) -> dict:
    import torch
    import transformers

    small = dict(n_layer=2, n_head=4, n_embd=128, n_positions=256, vocab_size=2048) if quick else {}
    config = transformers.GPT2Config(**small)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}


def case(folder: Path, lora: bool) -> dict:
    """One case in this process: load, (adapt), train WARMUP + TIMED steps; its figures."""
    import resource

    import torch

    from llmcore.config import LoraConfig, ModelConfig
    from llmcore.hf import load_pretrained, merge_config, read_model
    from llmcore.lora import apply_lora
    from llmcore.parallel import state_bytes

    cfg = merge_config(ModelConfig.model_validate({"block_size": BLOCK, "dropout": 0.0}), read_model(folder))
    model, hf = load_pretrained(folder, cfg)
    torch.manual_seed(0)
    if lora:
        apply_lora(model, LoraConfig())
    model.train()
    opt = model.configure_optimizer(0.1, 3e-5, (0.9, 0.95), "cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(WARMUP + TIMED):
        x = torch.randint(0, hf.vocab_size, (1, BLOCK + 1), generator=g)
        t0 = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated, as between the trainer's steps
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    state = state_bytes(model, opt)
    ms = 1000 * statistics.median(times)
    return {
        "case": "lora" if lora else "full",
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": trainable,
        "ms_per_step": ms,
        "tokens_per_sec": BLOCK / (ms / 1000),
        "state_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": times,
    }


def main() -> None:
    p = parser("lora", __doc__)
    p.add_argument("--case", choices=["full", "lora"], help=argparse_suppress())
    p.add_argument("--folder", type=Path, help=argparse_suppress())
    args = p.parse_args()
    if args.case:  # a child: one case, its result as JSON on stdout
        print(json.dumps(case(args.folder, args.case == "lora")))
        return
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-lora-") as tmp:
        folder = Path(tmp) / "gpt2"
        config = build_folder(folder, args.quick)
        rows = []
        for name in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--case", name, "--folder", str(folder)],
                                 capture_output=True, text=True, check=True, env=os.environ)  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"    {name}: {rows[-1]['ms_per_step']:.0f} ms/step", flush=True)
    what = "GPT-2 2x128" if args.quick else "GPT-2 124M"
    figures = []
    for r in rows:
        s = r["state_bytes"]
        label = "LoRA r 8 (attn.q, attn.v)" if r["case"] == "lora" else "full fine-tuning"
        figures += [
            figure(f"{what} {label}, fp32 1 x {BLOCK}: tokens/s (median of {TIMED})", r["tokens_per_sec"], "tok/s"),
            figure(f"  {label}: trainable parameters", r["trainable"], "params"),
            figure(f"  {label}: torch-tracked state (weights + grads + AdamW)", sum(s.values()) / 2**20, "MiB"),
            figure(f"  {label}: gradients + AdamW state", (s["grads"] + s["optimizer"]) / 2**20, "MiB"),
            figure(f"  {label}: peak RSS of the process", r["peak_rss_bytes"] / 2**20, "MiB"),
        ]
    write_report("lora", args, figures, {"config": config, "block_size": BLOCK, "cases": rows})


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
