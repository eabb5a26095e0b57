"""Inspect time: how long `gptlab inspect` (and the inspect stage) takes, split into the model's work and drawing.

    python bench/inspection.py [--quick] [--json PATH]        (from the repository root)

(Named inspection.py, not inspect.py: a script's directory comes first on sys.path, and a bench/inspect.py would
shadow the standard library's ``inspect`` module that torch and dataclasses import.)

Two models with random weights (time does not depend on them), fp32 on this CPU: the quickstart's (3 layers x 4
heads, 128 wide, block 128, its 2048-token BPE trained here on the standard library) and a 124M GPT-2-shaped one
(12 layers x 12 heads, 768 wide, block 1024, vocabulary 50257, tanh GELU). For each, with the quickstart's
eval.inspect (two prompts of 6 and 15 tokens, a 1500-character validation passage):
- one plain forward pass of the longer prompt, and ``llmcore.inspect.trace`` of it (hooks, the attention
  probabilities recomputed per layer, the logit lens through ln_f and the output head): the overhead of looking;
- ``compute`` (both prompts traced, the passage scored token by token): the model's part of the report;
- ``write_report`` (every figure drawn and encoded as PNG, report.html, inspect.json, attention.npz): drawing;
- the report's size on disk.
Medians of 20 (quick: 3) repetitions of the forward passes, after 3 warmups; one report each (after one warmup
report). Results: bench/results/inspection.json.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import QUICKSTART, figure, parser, stdlib_data, write_report

PASSAGE_CHARS = 1500


class Wider:
    """A tokenizer for a model whose vocabulary is larger than the tokenizer's (the 124M shape with the quickstart's
    BPE): ids beyond it decode as ``<id>``."""

    def __init__(self, tok):
        self.tok, self.eos_id = tok, tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tok.decode([i]) if i < self.tok.vocab_size else f"<{i}>" for i in ids)


def median_s(fn, repeats: int) -> float:
    """The median time of ``repeats`` calls after three warmup calls (on a shared 2-core machine single calls of a
    few milliseconds vary a hundredfold)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    args = parser("inspection", __doc__).parse_args()
    import torch
    import yaml

    from llmcore.config import ModelConfig, TokenizerConfig
    from llmcore.corpus import split_pieces
    from llmcore.inspect import compute, encode_prompt, trace
    from llmcore.inspect import write_report as write_inspect
    from llmcore.model import GPT
    from llmcore.tokenizer import Tokenizer, train_tokenizer

    inspect_cfg = yaml.safe_load(QUICKSTART.read_text())["eval"]["inspect"]
    prompts = inspect_cfg["prompts"]
    data = stdlib_data(max_bytes=1_000_000 if args.quick else 4_000_000, val_fraction=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(data, TokenizerConfig(model_type="bpe", vocab_size=2048, byte_fallback=True), Path(tmp), 1337)
        tok = Tokenizer.load(Path(tmp) / "tokenizer.model")
    val = next(text for split, text in split_pieces(data, 1337) if split == "val" and len(text) > PASSAGE_CHARS)
    passage = tok.encode(val[:PASSAGE_CHARS])
    models = {
        "quickstart (0.8M)": (ModelConfig(n_layer=3, n_head=4, n_embd=128, block_size=128), tok.vocab_size),
        "GPT-2 124M shape": (ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, mlp="gelu_tanh"), 50257),
    }
    repeats = 3 if args.quick else 20
    figures, details = [], {"threads": torch.get_num_threads(), "prompts": prompts, "passage_tokens": len(passage)}
    for name, (cfg, vocab) in models.items():
        torch.manual_seed(0)
        model, wide = GPT(cfg, vocab).eval(), Wider(tok)
        ids = torch.tensor([encode_prompt(model, tok, max(prompts, key=len))])
        with torch.no_grad():
            forward = median_s(lambda: model(ids, all_logits=True), repeats)
        traced = median_s(lambda: trace(model, wide, max(prompts, key=len)), repeats)
        with tempfile.TemporaryDirectory() as tmp:
            write_inspect(model, wide, compute(model, wide, prompts[:1], passage[:8]), Path(tmp) / "warm", "warmup")
            started = time.perf_counter()
            views = compute(model, wide, prompts, passage)
            computed = time.perf_counter() - started
            started = time.perf_counter()
            summary = write_inspect(model, wide, views, Path(tmp) / "report", name)
            drawn = time.perf_counter() - started
            size = sum((Path(tmp) / "report" / f).stat().st_size for f in summary["files"])
        figures += [
            figure(f"{name}: plain forward, {ids.size(1)}-token prompt", 1000 * forward, "ms"),
            figure(f"{name}: trace of it (hooks, attention, logit lens)", 1000 * traced, "ms"),
            figure(f"{name}: compute (2 prompts + {len(passage)}-token passage)", computed, "s"),
            figure(f"{name}: write_report (figures, PNGs, HTML)", drawn, "s"),
            figure(f"{name}: inspect in all", computed + drawn, "s"),
            figure(f"{name}: report size (all files)", size / 1e6, "MB"),
        ]
        details[f"{name} params"] = model.num_params()
        details[f"{name} files"] = len(summary["files"])
    write_report("inspection", args, figures, details)


if __name__ == "__main__":
    main()
