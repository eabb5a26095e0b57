"""Pretrained-model benchmark (issue 14): importing a 124M GPT-2 folder, and fine-tuning it on this CPU.

    python bench/pretrained.py [--quick] [--json PATH]        (from the repository root)

No GPT-2 files are downloaded: the folder is built as the hub holds it, ``transformers.GPT2Config()`` (gpt2's
defaults: 12 layers, 768 wide, 12 heads, 1024 positions, vocabulary 50257, tanh GELU) with random weights written
by ``GPT2LMHeadModel.save_pretrained`` (model.safetensors, about 500 MB), plus a byte-level BPE ``tokenizer.json``
trained with the ``tokenizers`` library on 16 MB of the standard library's source, padded to the model's 50257
tokens (``<|endoftext|>`` is id 0, so the config's bos/eos ids are 0). Import (``llmcore.hf.load_pretrained``:
config.json, safetensors, name map, transposes) is timed 3 times, alternating with
``transformers.GPT2LMHeadModel.from_pretrained`` for reference, each followed by one forward pass (1 x 64 tokens,
fp32): safetensors maps the file, so its pages are read when a weight is first used, and "+ first forward" is the
figure with every weight read. The file is in the page cache (it was just written): "first" is cold only for the
Python side. The two models' logits on that batch are compared. Training runs the spec's path: the tokenizer stage
imports the folder's tokenizer, the shards stage encodes 4 MB of standard-library source with it, the init stage
converts the folder (position table cropped to the block size) into a weights-only checkpoint, and llmcore's
``Trainer`` starts from it; ``Trainer.train_step`` is timed as bench/train_step.py does: fp32 on this CPU, batch
1 x block 256 and 1 x 1024, dropout 0.1, lr 3e-5 and AdamW as specs/gpt2_finetune.yaml, the median of 5 steps
after 3 (256) or 2 (1024) warmup steps; the 1-minute load average before and after each case is in the details
(other work on the machine slows torch's threads a lot). ``--quick`` uses a 2-layer, 128-wide GPT-2 with a
2048-token tokenizer. Results: bench/results/pretrained.json.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import figure, parser, stdlib_data, write_report
from shards import import_pretrained_tokenizer, train_byte_bpe

#: (block size, warmup steps, timed steps) of the training cases
FULL_CASES = [(256, 3, 5), (1024, 2, 5)]
QUICK_CASES = [(128, 2, 5)]
IMPORT_REPEATS = 3


def build_folder(folder: Path, quick: bool) -> dict:
    """A GPT-2 folder with random weights and a byte-level BPE tokenizer; what building it took."""
    import torch
    import transformers

    t0 = time.perf_counter()
    vocab = 2048 if quick else transformers.GPT2Config().vocab_size
    train_byte_bpe(folder, 1_000_000 if quick else 16_000_000, vocab, pad_to=vocab)
    tokenizer_s = time.perf_counter() - t0
    small = dict(n_layer=2, n_head=4, n_embd=128, n_positions=256) if quick else {}
    config = transformers.GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, **small)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return {
        "tokenizer_train_s": tokenizer_s,
        "save_pretrained_s": time.perf_counter() - t0,
        "config": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")},
        "weights_bytes": (folder / "model.safetensors").stat().st_size,
    }


def time_imports(folder: Path) -> tuple[dict[str, list[float]], dict[str, list[float]], float, int]:
    """Seconds of each import, alternating llmcore and transformers, and of the first forward pass after it (1 x 64
    tokens: every weight read; safetensors maps the file, so its pages are read when first used); the max |logit
    difference| of the two models on that batch; the non-embedding parameters."""
    import torch
    import transformers

    from llmcore.hf import load_pretrained

    def ours():
        model, _ = load_pretrained(folder)
        return model.eval(), lambda idx: model(idx, all_logits=True)[0]

    def theirs():
        model = transformers.GPT2LMHeadModel.from_pretrained(folder)
        return model.eval(), lambda idx: model(idx).logits

    torch.manual_seed(0)
    idx = torch.randint(0, read_vocab(folder), (1, 64))
    load_s: dict[str, list[float]] = {"llmcore": [], "transformers": []}
    forward_s: dict[str, list[float]] = {"llmcore": [], "transformers": []}
    logits, params = {}, 0
    for r in range(IMPORT_REPEATS):
        for name, load in (("llmcore", ours), ("transformers", theirs))[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            model, forward = load()
            t1 = time.perf_counter()
            with torch.no_grad():
                logits[name] = forward(idx)
            t2 = time.perf_counter()
            load_s[name].append(t1 - t0)
            forward_s[name].append(t2 - t1)
            print(f"    import {r + 1}/{IMPORT_REPEATS} {name}: {t1 - t0:.2f} s, forward {t2 - t1:.2f} s", flush=True)
            if name == "llmcore":
                params = model.num_params()
            del model, forward
            gc.collect()
    diff = (logits["llmcore"] - logits["transformers"]).abs().max().item()
    return load_s, forward_s, diff, params


def read_vocab(folder: Path) -> int:
    from llmcore.hf import read_model

    return read_model(folder).vocab_size


def time_training(tmp: Path, folder: Path, quick: bool) -> list[dict]:
    """The tokenizer, shards and init stages, then Trainer.train_step timed per block size."""
    import torch

    from llmcore import distributed as D
    from llmcore.checkpoint import save_weights
    from llmcore.config import ModelConfig, TrainConfig
    from llmcore.hardware import synchronize
    from llmcore.hf import load_pretrained, merge_config, read_model
    from llmcore.shards import write_shards
    from llmcore.train import Trainer, lr_at

    hf = read_model(folder)
    tok_dir = import_pretrained_tokenizer(folder, tmp / "tokenizer", hf.vocab_size)
    t0 = time.perf_counter()
    manifest = write_shards(stdlib_data(max_bytes=1_000_000 if quick else 4_000_000), tok_dir, tmp / "shards", 0)
    shards_s = time.perf_counter() - t0
    rows = []
    for block, warmup, steps in QUICK_CASES if quick else FULL_CASES:
        load = os.getloadavg()[0]  # timings on a shared machine: anything else running shows here
        cfg = merge_config(ModelConfig(block_size=block, dropout=0.1), hf)
        t0 = time.perf_counter()
        model, _ = load_pretrained(folder, cfg)
        init = save_weights(tmp / f"init-{block}", model, {"source": str(folder)})
        init_s = time.perf_counter() - t0
        del model
        gc.collect()
        train = TrainConfig(batch_size=1, lr=3e-5, lr_schedule="constant", warmup_steps=0, weight_decay=0.1,
                            device="cpu", precision="fp32", compile=False, eval_batches=1)  # fmt: skip
        t0 = time.perf_counter()
        trainer = Trainer(cfg, train, tmp / "shards", tmp / f"run-{block}", seed=1337, init=init)
        trainer_s = time.perf_counter() - t0
        times, losses = [], []
        try:
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                loss, _ = trainer.train_step(lr_at(i, trainer.cfg))
                losses.append(loss.item())  # what the loop does at each logged step
                synchronize(trainer.device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                print(f"    block {block}: step {i + 1}/{warmup + steps} {time.perf_counter() - t0:.2f} s", flush=True)
        finally:
            D.cleanup()
        sec = statistics.median(times)
        rows.append({
            "block_size": block, "batch_size": 1, "tokens_per_step": trainer.tokens_per_step,
            "params": trainer.model.num_params(), "warmup_steps": warmup, "timed_steps": len(times),
            "ms_per_step": 1000 * sec, "ms_per_step_min": 1000 * min(times),
            "tokens_per_sec": trainer.tokens_per_step / sec,
            "step_seconds": times, "losses": losses, "init_stage_s": init_s, "trainer_build_s": trainer_s,
            "shards_stage_s": shards_s, "shards_tokens": sum(s["tokens"] for s in manifest["splits"].values()),
            "torch_threads": torch.get_num_threads(), "load_avg_1m_before": load,
            "load_avg_1m_after": os.getloadavg()[0],
        })  # fmt: skip
        print(f"    block {block}: {rows[-1]['ms_per_step']:.0f} ms/step, {rows[-1]['tokens_per_sec']:.0f} tok/s")
        del trainer
        gc.collect()
    return rows


def main() -> None:
    args = parser("pretrained", __doc__).parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-pretrained-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "gpt2"
        built = build_folder(folder, args.quick)
        print(f"    built {folder}: {built['config']}, {built['weights_bytes'] / 1e6:.0f} MB of weights", flush=True)
        seconds, forward_s, diff, params = time_imports(folder)
        rows = time_training(tmp, folder, args.quick)
    what = "GPT-2 2x128" if args.quick else "GPT-2 124M"
    ours, theirs = seconds["llmcore"], seconds["transformers"]
    n = len(ours)
    with_forward = {k: [a + b for a, b in zip(seconds[k], forward_s[k])] for k in seconds}
    figures = [
        figure(f"import {what}: llmcore load_pretrained, median of {n}", statistics.median(ours), "s"),
        figure("  llmcore load_pretrained, first", ours[0], "s"),
        figure(f"  llmcore + first forward (1 x 64), median of {n}", statistics.median(with_forward["llmcore"]), "s"),
        figure(f"  transformers from_pretrained, median of {n}", statistics.median(theirs), "s"),
        figure("  transformers from_pretrained, first", theirs[0], "s"),
        figure(f"  transformers + first forward, median of {n}", statistics.median(with_forward["transformers"]), "s"),
        figure("  max |logit diff| vs transformers (1 x 64, fp32)", diff * 1e6, "1e-6"),
    ]
    for r in rows:
        name = f"fine-tune {what} fp32, 1 x {r['block_size']}"
        figures += [
            figure(f"{name}, median of {r['timed_steps']}", r["ms_per_step"], "ms/step"),
            figure(f"  {name}: tokens/s", r["tokens_per_sec"], "tok/s"),
            figure(f"  {name}: fastest step", r["ms_per_step_min"], "ms/step"),
        ]
    details = {
        "folder": built,
        "params_non_embedding": params,
        "import_seconds": seconds,
        "first_forward_seconds": forward_s,
        "max_abs_logit_diff": diff,
        "weights_in_page_cache": True,
        "training": rows,
    }
    write_report("pretrained", args, figures, details)


if __name__ == "__main__":
    main()
