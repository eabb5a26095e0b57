"""Task data as training data (llmcore.sft): task sources, the loss mask in the shards, the masked loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import gptlab, make_corpus, tiny_spec, write_spec

from llmcore.config import DataConfig, FilesSource, ModelConfig, TaskSource, TokenizerConfig, TrainConfig
from llmcore.corpus import CorpusError, corpus_fingerprint
from llmcore.model import GPT
from llmcore.sft import check_task_sources, is_val_question, source_questions, task_examples
from llmcore.shards import IGNORE_INDEX, BatchSampler, ShardDamagedError, TokenSplit, verify_shards, write_shards
from llmcore.tasks import encode_pair
from llmcore.tokenizer import Tokenizer, train_tokenizer
from llmcore.train import main as train_main

N_QUESTIONS = 60


def write_mc(path: Path, n: int = N_QUESTIONS) -> Path:
    rows = [{"context": f"What is {i} plus one?", "choices": [f"It is {i + 1}.", f"It is {i + 7}."], "answer": i % 2}
            for i in range(n)]  # fmt: skip
    for r in rows:  # the gold choice first or second
        if r["answer"]:
            r["choices"].reverse()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A text corpus, a multiple-choice task file, a tokenizer on both, and shards of text + task."""
    root = tmp_path_factory.mktemp("sft")
    corpus = make_corpus(root / "corpus", n_docs=20)
    task = write_mc(root / "task.jsonl")
    (root / "task.txt").write_text("".join(f"What is {i} plus one? It is {i + 1}.\n" for i in range(60)))
    tok_data = DataConfig(sources=[FilesSource(path=str(corpus)), FilesSource(path=str(root / "task.txt"))])
    train_tokenizer(tok_data, TokenizerConfig(vocab_size=200, num_threads=1), root / "tok", seed=0)
    model = root / "tok" / "tokenizer.model"
    data = DataConfig(sources=[FilesSource(path=str(corpus)), TaskSource(path=str(task))], val_fraction=0.2,
                      num_workers=1)  # fmt: skip
    manifest = write_shards(data, model, root / "shards", seed=3)
    return {"root": root, "data": data, "model": model, "tok": Tokenizer.load(model), "manifest": manifest,
            "task": task, "corpus": corpus}  # fmt: skip


def stream(shards: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    s = TokenSplit(shards, split)
    return s.read(0, s.tokens), np.concatenate([np.asarray(m) for m in s.masks])


def test_shards_carry_a_mask_recorded_and_verified_like_the_tokens(env):
    shards = env["root"] / "shards"
    for split in ("train", "val"):
        for entry in env["manifest"]["splits"][split]["shards"]:
            mask = (shards / entry["mask"]["file"]).read_bytes()
            assert len(mask) == entry["tokens"] and set(mask) <= {0, 1}
    verify_shards(shards)
    assert env["manifest"]["longest_answer"]["source"].startswith("data.sources.1 (")


def test_mask_counts_the_answers_and_eos_only_and_all_text_tokens(env):
    tok, data = env["tok"], env["data"]
    examples = list(task_examples(data, 3))
    for split in ("train", "val"):
        ids, mask = stream(env["root"] / "shards", split)
        text_docs = env["manifest"]["splits"][split]["documents"] - sum(e[0] == split for e in examples)
        # the text documents come first: every token counts; then the packed examples
        eos_at = np.flatnonzero(ids == tok.eos_id)
        text_end = eos_at[text_docs - 1] + 1
        assert mask[:text_end].all()
        at = text_end
        for _, _, prompt, answer in (e for e in examples if e[0] == split):
            ctx, cont = encode_pair(tok, prompt, answer)  # the scorer's split of prompt and answer
            n = len(ctx) + len(cont) + 1
            assert ids[at : at + n].tolist() == [*ctx, *cont, tok.eos_id]
            assert mask[at : at + n].tolist() == [0] * len(ctx) + [1] * (len(cont) + 1)
            at += n
        assert at == len(ids)
    answers = [a for _, _, _, a in examples]
    assert answers[0] == " It is 1." and answers[1] == " It is 2."  # the gold choice after the " " delimiter


def test_questions_split_by_question_with_the_seed(env):
    splits = {seed: [e[0] for e in task_examples(env["data"], seed)] for seed in (3, 4)}
    assert len(splits[3]) == N_QUESTIONS and 0 < splits[3].count("val") < N_QUESTIONS
    assert splits[3] != splits[4]
    assert splits[3] == [("val" if is_val_question(3, 1, i, 0.2) else "train") for i in range(N_QUESTIONS)]


def test_mask_prompt_false_counts_every_token(env, tmp_path):
    data = env["data"].model_copy(update={"mask_prompt": False})
    write_shards(data, env["model"], tmp_path, seed=3)
    assert stream(tmp_path, "train")[1].all()


def test_altered_mask_is_named(env, tmp_path):
    import shutil

    shutil.copytree(env["root"] / "shards", tmp_path / "s")
    mask = tmp_path / "s" / env["manifest"]["splits"]["train"]["shards"][0]["mask"]["file"]
    raw = bytearray(mask.read_bytes())
    raw[0] ^= 1
    mask.write_bytes(bytes(raw))
    with pytest.raises(ShardDamagedError, match="mask.bin: sha256"):
        TokenSplit(tmp_path / "s", "train")


def test_batches_ignore_masked_targets_and_the_loss_matches_a_hand_computation(env):
    split = TokenSplit(env["root"] / "shards", "train")
    sampler = BatchSampler(split, batch_size=8, block_size=24, seed=0)
    x, y = sampler.next_batch()
    ignored = y == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    # the ignored targets are exactly the masked ones: redraw the same windows without the mask
    split_nomask = TokenSplit(env["root"] / "shards", "train")
    split_nomask.masks = None
    x2, y2 = BatchSampler(split_nomask, batch_size=8, block_size=24, seed=0).next_batch()
    assert torch.equal(x, x2) and torch.equal(y[~ignored], y2[~ignored])
    x1, y1 = BatchSampler(split, batch_size=1, block_size=24, seed=0).next_batch()  # one row: x and y share memory
    x3, _ = BatchSampler(split_nomask, batch_size=1, block_size=24, seed=0).next_batch()
    assert torch.equal(x1, x3) and (x1 >= 0).all()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=24), split.vocab_size)
    logits, loss = model(x, y)
    hand = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
    by_hand = -torch.log_softmax(logits, -1).gather(-1, y2[..., None])[..., 0][~ignored].mean()
    assert torch.allclose(loss, hand) and torch.allclose(loss, by_hand)
    assert not torch.allclose(loss, F.cross_entropy(logits.reshape(-1, logits.size(-1)), y2.reshape(-1)))
    _, none = model(x, torch.full_like(y, IGNORE_INDEX))  # nothing counts: 0, not NaN
    assert none.item() == 0.0


def test_task_file_content_is_in_the_fingerprint(env, tmp_path):
    task = write_mc(tmp_path / "t.jsonl")
    data = DataConfig(sources=[TaskSource(path=str(task))])
    before = corpus_fingerprint(data)
    task.write_text(task.read_text().replace("plus", "PLUS"))
    assert corpus_fingerprint(data) != before


def test_derived_next_line_questions_come_from_the_training_documents(env):
    data = DataConfig(sources=[FilesSource(path=str(env["corpus"])), TaskSource(format="next_line")], val_fraction=0.3)
    from llmcore.corpus import split_pieces

    train_lines = {line for s, t in split_pieces(data, 5) if s == "train" for line in t.split("\n")}
    questions = source_questions(1, data.sources[1], data, 5)
    assert questions and all(q.context in train_lines and q.choices[q.answer] in train_lines for q in questions)
    answers = [a for _, _, _, a in task_examples(data, 5)]
    assert all(a.startswith("\n") for a in answers)


def test_malformed_row_names_the_file_line_and_field(tmp_path):
    task = write_mc(tmp_path / "t.jsonl", 5)
    with open(task, "a") as f:
        f.write(json.dumps({"context": "x", "choices": ["a", "b"]}) + "\n")
    errors = check_task_sources(DataConfig(sources=[TaskSource(path=str(task))]))
    assert len(errors) == 1 and errors[0].field == "data.sources.0.path"
    assert f"{task}, line 6: field 'answer' is missing" in str(errors[0])
    csv = tmp_path / "exam.csv"
    csv.write_text("id,prompt,A,B,C,D,E,answer\n0,Q?,a,b,c,d,e,F\n")
    (err,) = check_task_sources(DataConfig(sources=[TaskSource(path=str(csv), format="kaggle_science_exam")]))
    assert f"{csv}, line 2: field 'answer' must be one of A-E" in str(err)
    (err,) = check_task_sources(DataConfig(sources=[TaskSource(path=str(tmp_path / "missing.jsonl"))]))
    assert isinstance(err, CorpusError) and err.field == "data.sources.0.path"
    assert "missing.jsonl: no such file" in str(err)


def test_answer_longer_than_the_block_is_bad_input(env, tmp_path, capsys):
    train = TrainConfig(max_steps=1, device="cpu", eval_batches=1, batch_size=2)
    cfg = {"model": ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=4).model_dump(),
           "train": train.model_dump(), "seed": 1}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    code = train_main(["--config", str(tmp_path / "c.json"), "--shards", str(env["root"] / "shards"),
                       "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "model.block_size: 4 tokens cannot hold an answer of" in err and str(env["task"]) in err


def test_validate_reports_bad_task_sources_with_exit_2(env, tmp_path):
    bad = write_mc(tmp_path / "bad.jsonl", 3)
    with open(bad, "a") as f:
        f.write("{not json\n")
    sources = [{"type": "files", "path": str(env["corpus"])}, {"type": "task", "path": str(bad)}]
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(env["corpus"], tmp_path / "runs", data={"sources": sources}))
    proc = gptlab("validate", spec)
    assert proc.returncode == 2, proc.stderr
    assert "data.sources.1.path" in proc.stderr and f"{bad}, line 4: not JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    sources[1] = {"type": "task", "path": str(bad), "format": "quiz"}
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(env["corpus"], tmp_path / "runs", data={"sources": sources}))
    proc = gptlab("validate", spec)
    assert proc.returncode == 2 and "data.sources.1" in proc.stderr and "format" in proc.stderr, proc.stderr
    sources[1] = {"type": "task", "format": "hellaswag"}
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(env["corpus"], tmp_path / "runs", data={"sources": sources}))
    proc = gptlab("validate", spec)
    assert proc.returncode == 2 and "data.sources.1" in proc.stderr and "needs a task file" in proc.stderr


@pytest.mark.slow
def test_submit_fine_tunes_on_a_task_mixed_with_text(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=20)
    task = write_mc(tmp_path / "task.jsonl")
    sources = [{"type": "files", "path": str(corpus)}, {"type": "task", "path": str(task)}]
    tree = tiny_spec(corpus, tmp_path / "runs", data={"sources": sources},
                     eval={"batches": 2, "batch_size": 8, "prompts": ["The "], "max_new_tokens": 5,
                           "tasks": [{"name": "mc", "path": str(task)}]})  # fmt: skip
    tree["tokenizer"]["vocab_size"] = 80
    proc = gptlab("submit", write_spec(tmp_path / "s.yaml", tree), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    masks = list((tmp_path / "runs").rglob("train-00000.mask.bin"))
    assert len(masks) == 1
    tasks = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("DONE.json") if "mc.jsonl" in
             {q.name for q in p.parent.iterdir()}]  # fmt: skip
    assert tasks


@pytest.mark.slow
def test_science_exam_spec_fine_tunes_a_gpt2_folder_on_a_kaggle_csv(tmp_path):
    from helpers import gpt2_folder

    corpus = make_corpus(tmp_path / "corpus", n_docs=20)
    folder = gpt2_folder(tmp_path / "gpt2", corpus, n_positions=512)
    rows = [f'{i},"Which word follows the number {i} in the little list of plain words?",alpha {i},beta {i},'
            f"gamma {i},delta {i},epsilon {i},{'ABCDE'[i % 5]}\n" for i in range(200)]  # fmt: skip
    header = "id,prompt,A,B,C,D,E,answer\n"
    (tmp_path / "train.csv").write_text(header + "".join(rows[:150]))
    (tmp_path / "heldout.csv").write_text(header + "".join(rows[150:]))
    spec = Path(__file__).resolve().parents[1] / "specs" / "science_exam_sft.yaml"
    sets = [f"runs_root={tmp_path / 'runs'}", f"model.init_from.path={folder}",
            f"data.sources.0.path={tmp_path / 'train.csv'}", f"eval.tasks.0.path={tmp_path / 'heldout.csv'}",
            "train.max_steps=3", "train.eval_batches=2", "train.grad_accum=2", "eval.batches=2",
            "eval.max_new_tokens=4", "train.device=cpu"]  # fmt: skip
    proc = gptlab("submit", spec, *[a for s in sets for a in ("--set", s)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (manifest,) = (tmp_path / "runs" / "stages").rglob("manifest.json")
    m = json.loads(manifest.read_text())
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 150  # one example per question
    assert all("mask" in e for s in m["splits"].values() for e in s["shards"])
    (scored,) = (tmp_path / "runs" / "stages").rglob("science.jsonl")  # (MLflow keeps a copy under mlartifacts)
    predictions = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(predictions) == 50 and all("map3" in p for p in predictions)
