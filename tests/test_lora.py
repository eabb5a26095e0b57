"""LoRA (train.lora): the adapter layers against peft itself (the same adapters merged by peft and by gptlab give the
same weights; unmerged and merged logits agree), training that changes only the adapters, adapter-only checkpoints
tied to the base weights' sha256, resume to the same curve, the merged final weights every reader loads, the memory
estimate against what torch holds, bad input, and 2-rank FSDP through mpiexec against one rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import child_env, free_port, records, require_mpiexec, run_shell, train_command
from pydantic import ValidationError
from safetensors.torch import load_file

from llmcore.checkpoint import (
    LORA_FILE,
    MODEL_FILE,
    CheckpointError,
    checkpoints,
    latest_checkpoint,
    load_model,
    save_weights,
)
from llmcore.config import LoraConfig, ModelConfig, TrainConfig
from llmcore.distributed import mpiexec_prefix
from llmcore.hf import export_model, from_gptlab
from llmcore.lora import apply_lora, lora_layers, merged_model
from llmcore.memory import estimate_memory
from llmcore.model import GPT
from llmcore.parallel import state_bytes
from llmcore.shards import TokenSplit
from llmcore.train import train

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
STEPS = 30
BASE = dict(batch_size=4, max_steps=STEPS, warmup_steps=3, lr=1e-2, lr_schedule="constant", eval_interval=10,
            eval_batches=2, checkpoint_interval=10, device="cpu", precision="fp32")  # fmt: skip
SEED = 3


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, "lora": {}, **kw})


def randomize_adapters(model: GPT, seed: int = 0) -> None:
    """B starts at zero (the base model exactly); give it values so that the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(llm_shards, tmp_path_factory) -> Path:
    """A 'pretrained' base: a briefly trained full model's weights, as the init stage writes them."""
    out = tmp_path_factory.mktemp("lora_base")
    full = TrainConfig(**{**BASE, "max_steps": 20, "checkpoint_interval": 20})
    train(MODEL, full, llm_shards, out / "run", seed=1)
    model, _ = load_model(out / "run")
    return save_weights(out / "weights", model)


# ------------------------------------------------------------------------------------------ the layers


def test_adapters_start_at_the_base_model_and_only_they_train():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16), 50).eval()
    idx = torch.randint(0, 50, (2, 16))
    before = model(idx, all_logits=True)[0]
    targets = apply_lora(model, LoraConfig(targets=["attn.*", "mlp.c_*"]))
    assert targets[:3] == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"] and len(targets) == 12
    assert torch.equal(model(idx, all_logits=True)[0], before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "blocks.0.attn.c_attn.weight" in model.state_dict()  # the base keeps its names
    k = model.blocks[0].attn.c_attn
    assert (k.lora_B["q"].shape, k.lora_B["k"].shape, k.lora_A["v"].shape) == ((32, 8), (16, 8), (8, 32))


@pytest.mark.parametrize("targets", [["attn.q", "attn.v"], ["attn.*", "mlp.c_proj"], ["blocks.1.attn.k"]])
def test_the_same_adapters_merged_by_peft_and_by_gptlab_give_the_same_weights(tmp_path, targets):
    """A Llama-architecture model (separate q, k, v, o, down projections in transformers: peft adapts each): the base
    exported, peft's LoraConfig on it with our A and B copied in; merged weights, and logits merged or not."""
    torch.manual_seed(1)
    cfg_ = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24, pos_encoding="rope",
                       norm="rmsnorm", mlp="swiglu")  # fmt: skip
    model = GPT(cfg_, 71)
    export_model(model, tmp_path / "base", bos_id=None, eos_id=None)
    lora = LoraConfig(r=4, alpha=12, dropout=0.0, targets=targets)
    adapted = apply_lora(model, lora)
    randomize_adapters(model)
    model.eval()
    theirs_names = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                    "attn.c_proj": "self_attn.o_proj", "mlp.c_proj": "mlp.down_proj"}  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    modules = sorted({theirs_names[t.split(".", 2)[2]].split(".")[1] for t in adapted})
    ours_at = {f"model.layers.{t.split('.')[1]}.{theirs_names[t.split('.', 2)[2]]}": t for t in adapted}
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=modules))
    state = model.state_dict()
    with torch.no_grad():
        for name, module in pm.base_model.model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            t = ours_at.get(name)
            if t is None:  # a layer peft adapts that we do not (target_modules match in every layer): no update
                module.lora_B["default"].weight.zero_()
                continue
            block, sub = t.rsplit(".", 2)[0], t.split(".", 2)[2]
            layer, sl = (f"{block}.attn.c_attn", sub[-1]) if sub in ("attn.q", "attn.k", "attn.v") else (t, "all")
            module.lora_A["default"].weight.copy_(state[f"{layer}.lora_A.{sl}"])
            module.lora_B["default"].weight.copy_(state[f"{layer}.lora_B.{sl}"])
    pm.eval()
    idx = torch.randint(0, 71, (3, 24))
    with torch.no_grad():
        ours_unmerged = model(idx, all_logits=True)[0]
        peft_unmerged = pm(input_ids=idx).logits
        merged = merged_model(model).eval()
        ours_merged = merged(idx, all_logits=True)[0]
    peft_weights = pm.merge_and_unload().state_dict()
    ours_weights, _ = from_gptlab(merged)
    diffs = {k: (ours_weights[k] - peft_weights[k]).abs().max().item() for k in ours_weights}
    worst = max(diffs.values())
    print(f"targets {targets}: max |merged weight difference| gptlab vs peft {worst:.2e}; logits unmerged vs merged "
          f"{(ours_unmerged - ours_merged).abs().max().item():.2e}, vs peft unmerged "
          f"{(ours_unmerged - peft_unmerged).abs().max().item():.2e}")  # fmt: skip
    assert worst < 1e-5, max(diffs, key=diffs.get)
    assert (ours_unmerged - ours_merged).abs().max().item() < 1e-5
    assert (ours_unmerged - peft_unmerged).abs().max().item() < 1e-5
    changed = [
        k for k in ours_weights if (ours_weights[k] - load_file(tmp_path / "base" / MODEL_FILE)[k]).abs().max() > 0
    ]
    assert changed and all("proj" in k for k in changed)  # the adapters did change the adapted weights, only those


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def reference(llm_shards, base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_ref")
    train(MODEL, cfg(), llm_shards, out, seed=SEED, init=base)
    return out


def test_lora_training_keeps_adapters_only_and_ends_with_merged_weights(reference, base):
    rows = records(reference)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    for ck in checkpoints(reference):
        meta = json.loads((ck / "meta.json").read_text())
        assert (
            meta["lora"]["base_sha256"] == json.loads((base / "DONE.json").read_text())["files"][MODEL_FILE]["sha256"]
        )
        adapters = load_file(ck / LORA_FILE)
        assert adapters and all(".lora_" in k for k in adapters)
        state = torch.load(ck / "state.pt", weights_only=True)["optimizer"]["state"]
        assert len(state) == len(adapters)  # AdamW state for the adapters only
    final = latest_checkpoint(reference)
    plain, meta = load_model(reference)  # no LoRA knowledge needed: the merged weights
    assert meta["step"] == STEPS and not lora_layers(plain)
    base_model, _ = load_model(base)
    trained = load_file(final / MODEL_FILE)
    moved = {k for k in trained if not torch.equal(trained[k], base_model.state_dict()[k])}
    assert moved == {f"blocks.{i}.attn.c_attn.weight" for i in range(2)}  # q and v rows of c_attn, nothing else
    v_rows = slice(32, 64)  # k rows are untouched
    assert torch.equal(trained["blocks.0.attn.c_attn.weight"][v_rows], base_model.blocks[0].attn.c_attn.weight[v_rows])
    # an earlier checkpoint holds adapters only, and says what it needs
    earlier = checkpoints(reference)[1]
    assert not (earlier / MODEL_FILE).exists()
    with pytest.raises(CheckpointError, match=r"a LoRA checkpoint holding the adapters only \(lora.safetensors"):
        load_model(earlier)


def test_resumed_lora_run_continues_the_same_curve(llm_shards, base, reference, tmp_path):
    train(MODEL, cfg(max_steps=15), llm_shards, tmp_path, seed=SEED, init=base)
    again = train(MODEL, cfg(), llm_shards, tmp_path, seed=SEED, init=base)
    assert again["steps"] == STEPS
    a, b = ({r["step"]: r["loss"] for r in records(d)} for d in (tmp_path, reference))
    assert sorted(a) == sorted(b) and max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert torch.equal(load_file(latest_checkpoint(tmp_path) / MODEL_FILE)["blocks.1.attn.c_attn.weight"],
                       load_file(latest_checkpoint(reference) / MODEL_FILE)["blocks.1.attn.c_attn.weight"])  # fmt: skip


def test_adapters_of_another_base_are_not_resumed_and_say_why(llm_shards, base, tmp_path):
    train(MODEL, cfg(max_steps=10), llm_shards, tmp_path / "run", seed=SEED, init=base)
    model, _ = load_model(base)
    with torch.no_grad():
        model.ln_f.weight.add_(1.0)
    other = save_weights(tmp_path / "other", model)
    with pytest.warns(UserWarning, match=r"its LoRA adapters belong to base weights with sha256 [0-9a-f]{64}, but "
                                         r"this run's base \(model.init_from\) has [0-9a-f]{64}"):  # fmt: skip
        summary = train(MODEL, cfg(max_steps=12), llm_shards, tmp_path / "run", seed=SEED, init=other)
    assert summary["steps"] == 12 and records(tmp_path / "run")[0]["step"] == 1  # started again from the new base


def test_memory_estimate_counts_frozen_weights_without_gradients_or_adamw_state(llm_shards, base):
    vocab = TokenSplit(llm_shards, "train").vocab_size
    t = cfg(lora={"r": 4, "targets": ["attn.*", "mlp.c_fc"]})
    model, _ = load_model(base)
    apply_lora(model, t.lora)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    model.train()
    idx = torch.randint(0, vocab, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    measured = state_bytes(model, opt)
    est = estimate_memory(MODEL, vocab, t, world_size=1)
    full = estimate_memory(MODEL, vocab, t.model_copy(update={"lora": None}), world_size=1)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (
        measured["params"], measured["grads"], measured["optimizer"])  # fmt: skip
    assert est.grad_bytes < full.grad_bytes / 4 and est.trainable == sum(
        p.numel() for p in opt.param_groups[0]["params"]
    )
    assert "LoRA: " in est.summary()


# ------------------------------------------------------------------------------------------- bad input


def run_main(tmp_path: Path, shards: Path, train_cfg: dict, init: Path | None) -> tuple[int, str]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": MODEL.model_dump(), "train": {**BASE, **train_cfg}, "seed": 0}))
    argv = ["--config", str(config), "--shards", str(shards), "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "llmcore.train", *argv, *(["--init", str(init)] if init else [])],
                          capture_output=True, text=True, env=child_env(), timeout=120)  # fmt: skip
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "train_cfg, use_init, message, at_validate",
    [
        ({"lora": {"targets": ["attn.query"]}}, True, "train.lora.targets: 'attn.query' matches no layer", True),
        ({"lora": {"targets": ["blocks.7.attn.q"]}}, True,  # the block count comes with the model: training checks
         "train.lora.targets: 'blocks.7.attn.q' matches no layer of this 2-block model", False),
        ({"lora": {}, "freeze": ["wte.*"]}, True, "train.freeze: LoRA already keeps every weight", True),
        ({"lora": {"r": 0, "alpha": 0}}, True, "train.lora.r: Input should be greater than or equal to 1", True),
        ({"lora": {}}, False, "train.lora: adapts pretrained weights: set model.init_from", False),
    ],
    ids=["no-such-layer", "no-such-block", "with-freeze", "bad-r-alpha", "no-base"],
)  # fmt: skip
def test_bad_lora_settings_exit_2_naming_the_field(llm_shards, base, tmp_path, train_cfg, use_init, message,
                                                    at_validate):  # fmt: skip
    code, err = run_main(tmp_path, llm_shards, train_cfg, base if use_init else None)
    assert code == 2 and message in err and "Traceback" not in err, err
    if "alpha" in train_cfg["lora"]:
        assert "train.lora.alpha: Input should be greater than 0" in err  # every problem at once
    if at_validate:  # the config itself is refused: `gptlab validate` reports it before anything runs
        with pytest.raises(ValidationError):
            TrainConfig(**{**BASE, **train_cfg})


# ------------------------------------------------------------------------------------------------- FSDP


@pytest.mark.mpi
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_lora_on_two_ranks_matches_one_rank(llm_shards, base, tmp_path, parallelism):
    require_mpiexec()
    lora = {"r": 4, "dropout": 0.0, "targets": ["attn.q", "attn.v", "mlp.c_proj"]}  # dropout masks differ by rank
    train(MODEL, cfg(grad_accum=2, max_steps=12, lora=lora), llm_shards, tmp_path / "one", seed=SEED, init=base)
    two = cfg(max_steps=12, lora=lora, parallelism=parallelism, ranks_per_node=2)
    config = tmp_path / "two.json"
    config.write_text(json.dumps({"model": MODEL.model_dump(), "train": two.model_dump(), "seed": SEED}))
    command = f"{mpiexec_prefix(2, 2)} {train_command(config, llm_shards, tmp_path / 'two')} --init {base}"
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPTLAB_RANKS="2")
    proc = run_shell(command, env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    a, b = ({r["step"]: r["loss"] for r in records(tmp_path / d)} for d in ("one", "two"))
    worst_loss = max(abs(a[s] - b[s]) for s in a)
    print(f"LoRA {parallelism} x2 vs one rank x2 micro-batches: max |loss difference| {worst_loss:.2e}")
    assert sorted(a) == sorted(b) == list(range(1, 13)) and worst_loss < 1e-5
    step = tmp_path / "two" / "checkpoints" / "step_00000010"
    assert json.loads((step / "meta.json").read_text())["lora"]
    assert MODEL_FILE not in [p.name for p in step.iterdir()]  # adapters only (DDP: lora.safetensors; FSDP: DCP)
    one, two = load_model(tmp_path / "one")[0], load_model(tmp_path / "two")[0]  # the final, merged weights
    worst = max((one.state_dict()[k] - v).abs().max().item() for k, v in two.state_dict().items())
    assert worst < 1e-5
