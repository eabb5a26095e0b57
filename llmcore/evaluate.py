"""Evaluation of a trained model: validation loss, perplexity, bits per byte, and samples.

    python -m llmcore.evaluate --train-dir RUN --shards SHARDS --tokenizer tokenizer.model --out DIR
        [--config eval.json] [--seed 0] [--device auto]

Bits per byte = total token loss in bits / UTF-8 bytes of the text those tokens encode
= val_loss / ln 2 * val_tokens / val_bytes (token and byte counts of the val split, from the manifest). Unlike
loss or perplexity it does not depend on the tokenizer, so runs with different tokenizers are comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from llmcore import exitcodes
from llmcore.checkpoint import CheckpointError, load_model
from llmcore.config import EvalConfig
from llmcore.hardware import resolve_device, resolve_precision
from llmcore.io import atomic_write_bytes, atomic_write_json
from llmcore.shards import ShardError, TokenSplit, fixed_batches, iter_sequential
from llmcore.tokenizer import load_tokenizer


@torch.no_grad()
def token_loss(model, batches, device: torch.device, dtype: torch.dtype | None) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of target tokens) over (x, y) batches."""
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in batches:
        n = int((y != -100).sum())  # counted on the host copy: no device sync per batch
        if n == 0:
            continue
        with ctx:
            _, loss = model(x.to(device), y.to(device))  # mean over the n targets (cross-entropy runs in fp32)
        total += loss.double() * n
        count += n
    return total.item(), count


def sample(model, tok: Any, cfg: EvalConfig, device: torch.device, seed: int) -> list[dict[str, str]]:
    """One continuation per prompt (an empty prompt starts from EOS); `text` is the continuation only."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for prompt in cfg.prompts:
        ids = tok.encode(prompt) or [tok.eos_id]
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        y = model.generate(
            idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator
        )
        out.append({"prompt": prompt, "text": tok.decode(y[0, len(ids) :].tolist())})
    return out


def evaluate(
    train_dir: Path,
    shards_dir: Path,
    tokenizer: Path,
    cfg: EvalConfig,
    out_dir: Path,
    seed: int,
    device: str = "auto",
) -> dict:
    """Evaluate the newest committed checkpoint in train_dir; write eval.json and samples.txt to out_dir."""
    dev = resolve_device(device)
    model, meta = load_model(train_dir, dev)
    val = TokenSplit(shards_dir, "val")
    T = model.cfg.block_size
    if cfg.batches == 0:
        batches = iter_sequential(val, cfg.batch_size, T)
    else:
        batches = fixed_batches(val, cfg.batches, cfg.batch_size, T, seed)
    nats, n = token_loss(model, batches, dev, resolve_precision("auto", dev))
    val_loss = nats / n
    tok = load_tokenizer(tokenizer)
    result = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_bpb": val_loss / math.log(2) * val.tokens / val.bytes,
        "tokens_evaluated": n,
        "step": meta["step"],
        "checkpoint": meta["path"],
        "samples": sample(model, tok, cfg, dev, seed),
    }
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "eval.json", result)
    text = "".join(f"=== prompt: {s['prompt']!r}\n{s['prompt']}{s['text']}\n\n" for s in result["samples"])
    atomic_write_bytes(out_dir / "samples.txt", text.encode("utf-8"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmcore.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--train-dir", type=Path, required=True, help="training output (or one checkpoint) directory")
    p.add_argument("--shards", type=Path, required=True, help="shards directory (with manifest.json)")
    p.add_argument("--tokenizer", type=Path, required=True, help="the tokenizer stage directory (or its file)")
    p.add_argument("--out", type=Path, required=True, help="where eval.json and samples.txt go")
    p.add_argument("--config", type=Path, help="JSON EvalConfig (defaults if omitted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        cfg = EvalConfig.model_validate_json(args.config.read_text(encoding="utf-8")) if args.config else EvalConfig()
    except (OSError, ValidationError) as e:
        print(f"invalid eval config {args.config}: {e}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    try:
        result = evaluate(args.train_dir, args.shards, args.tokenizer, cfg, args.out, args.seed, args.device)
    except (CheckpointError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
