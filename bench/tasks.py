"""Benchmark-task scoring throughput: questions per second, batched against one question at a time.

    python bench/tasks.py [--quick] [--json PATH]        (from the repository root)

The quickstart's task (``next_line``: which of four lines follows a line, derived from held-out standard-library
files by ``llmcore.tasks.next_line_questions``) scored by ``llmcore.tasks.score_task`` on two models with random
weights (throughput does not depend on them): the quickstart's (3 layers, 128 wide, block 128, a 2048-token
BPE) and a 124M GPT-2-shaped one (12 layers, 768 wide, 12 heads, block 1024, vocabulary 50257, tanh GELU).
Each is timed with all choices of several questions in one padded forward pass (``eval.batch_size`` 16
sequences, and 64) and with one question's choices at a time (batch 4: the four choices of one question), fp32 on this
CPU, after one warmup pass. Results: bench/results/tasks.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import figure, parser, stdlib_data, write_report


def main() -> None:
    args = parser("tasks", __doc__).parse_args()
    import torch

    from llmcore.config import ModelConfig, TaskConfig, TokenizerConfig
    from llmcore.corpus import split_pieces
    from llmcore.model import GPT
    from llmcore.tasks import next_line_questions, score_task
    from llmcore.tokenizer import Tokenizer, train_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = stdlib_data(max_bytes=1_000_000 if args.quick else 4_000_000, val_fraction=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(data, TokenizerConfig(model_type="bpe", vocab_size=2048, byte_fallback=True), Path(tmp), 1337)
        tok = Tokenizer.load(Path(tmp) / "tokenizer.model")
    val = (text for split, text in split_pieces(data, 1337) if split == "val")
    questions = next_line_questions(val, 400, 1337)
    cfg = TaskConfig(name="next_line", format="next_line")
    models = {
        "quickstart (0.8M)": (ModelConfig(n_layer=3, n_head=4, n_embd=128, block_size=128), tok.vocab_size, 200, 400),
        "GPT-2 124M shape": (ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, mlp="gelu_tanh"), 50257,
                             24, 48),
    }  # fmt: skip
    figures, details = [], {"questions": len(questions), "threads": torch.get_num_threads()}
    for name, (mcfg, vocab, n_quick, n_full) in models.items():
        torch.manual_seed(0)
        model = GPT(mcfg, vocab).eval()
        n = n_quick if args.quick else n_full
        score_task(model, tok, questions[:4], cfg, 0, batch_size=16)  # warmup
        rates = {}
        for label, batch in (("batched (16 sequences)", 16), ("batched (64 sequences)", 64),
                             ("one question at a time", 4)):  # fmt: skip
            started = time.perf_counter()
            scores = score_task(model, tok, questions[:n], cfg, 0, batch_size=batch)
            rates[label] = n / (time.perf_counter() - started)
            details[f"{name} {label} acc"] = scores.metrics["acc"]
        for label, rate in rates.items():
            figures.append(figure(f"{name}: {label}", rate, "questions/s"))
        speedup = rates["batched (16 sequences)"] / rates["one question at a time"]
        figures.append(figure(f"{name}: batching speed-up", speedup, "x"))
        details[f"{name} params"] = model.num_params()
        details[f"{name} questions timed"] = n
    write_report("tasks", args, figures, details)


if __name__ == "__main__":
    main()
