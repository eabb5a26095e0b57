"""Benchmark tasks: multiple-choice scoring by log-likelihood, checked against lm-evaluation-harness itself.

A tiny model is trained by a real submit, its task stage scores a local JSONL task, and the same questions go
through ``lm_eval.simple_evaluate`` on the model exported with ``gptlab export``: accuracy, normalised accuracy
and every per-question prediction must be equal. The task file readers, MAP@3, the few-shot rule, the stage's
caching and the errors on defective files are checked here too.
"""

from __future__ import annotations

import json
import random

import pytest
from helpers import gptlab, make_corpus, tiny_spec, write_spec
from mlflow.tracking import MlflowClient

from llmcore.config import TaskConfig
from llmcore.tasks import (
    Question,
    TaskError,
    encode_pair,
    fewshot_context,
    map_at_3,
    next_line_questions,
    read_questions,
    score_task,
)
from workflows import submit

# ------------------------------------------------------------------------------------------ task files


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the "
     "window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "ignored when ctx_a is",
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
     "supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a "
     "christmas coat, knitted with netting.", ", the man continues removing the snow on his car."], "label": "3"},
    {"ind": 9, "activity_label": "Home and Garden", "ctx": "[header] How to clean a grill [title] Heat the grill.",
     "endings": ["[step] Scrub it  well.", "Leave it.", "Paint it [title] red.", "Sell it."], "label": 0},
]  # fmt: skip


def test_hellaswag_is_preprocessed_as_lm_evaluation_harness_does(tmp_path):
    import datasets
    from lm_eval.tasks.hellaswag.utils import preprocess, process_docs

    path = write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG[:1])
    (q,) = read_questions(path, "hellaswag")
    (want,) = process_docs(datasets.Dataset.from_list(HELLASWAG[:1]))
    assert (q.context, list(q.choices), q.answer) == (want["query"], want["choices"], want["gold"])
    # a record with `ctx` only (no ctx_a/ctx_b) uses it whole, cleaned the same way
    q2 = read_questions(write_jsonl(tmp_path / "h2.jsonl", HELLASWAG[1:]), "hellaswag")[0]
    assert q2.context == "Home and Garden: How to clean a grill. Heat the grill."
    assert list(q2.choices) == [preprocess(e) for e in HELLASWAG[1]["endings"]] and q2.answer == 0


def test_kaggle_science_exam_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(
        "id,prompt,A,B,C,D,E,answer,extra\n"
        '0,"Which particle has no charge?",proton,neutron,electron,positron,muon,B,ignored\n'
        '1,"What is H2O, commonly?",salt,"water, mostly",air,fire,earth,B,\n',
        encoding="utf-8",
    )
    questions = read_questions(path, "kaggle_science_exam")
    assert questions[1] == Question("1", "Question: What is H2O, commonly?\nAnswer:",
                                    ("salt", "water, mostly", "air", "fire", "earth"), 1)  # fmt: skip


def test_map_at_3_by_hand():
    scores = [-3.0, -1.0, -2.0, -5.0, -4.0]  # ranked: B, C, A, E, D
    assert [map_at_3(scores, a) for a in range(5)] == [pytest.approx(1 / 3), 1.0, 0.5, 0.0, 0.0]
    assert map_at_3([-1.0, -1.0, -2.0], 1) == 0.5  # a tie ranks the earlier choice first
    # a file of three questions answered at ranks 1, 3 and 4: MAP@3 = (1 + 1/3 + 0) / 3
    per_question = [map_at_3(scores, 1), map_at_3(scores, 0), map_at_3(scores, 4)]
    assert sum(per_question) / 3 == pytest.approx(4 / 9)


DEFECTS = {
    "not JSON": ("multiple_choice", '{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": oops}\n',
                 "line 2: not JSON"),
    "missing field": ("multiple_choice", '{"context": "a", "choices": ["x", "y"], "answer": 0}\n'
                      '{"context": "a", "answer": 0, "label": 1}\n',
                      "line 2: field 'choices' is missing (the record has: answer, context, label)"),
    "answer out of range": ("multiple_choice", '{"context": "a", "choices": ["x", "y"], "answer": 2}\n',
                            "line 1: field 'answer' must be an index from 0 to 1, found 2"),
    "one choice": ("multiple_choice", '{"context": "a", "choices": ["x"], "answer": 0}\n',
                   "line 1: field 'choices' must list at least two non-empty strings"),
    "wrong type": ("multiple_choice", '{"context": 3, "choices": ["x", "y"], "answer": 0}\n',
                   "line 1: field 'context' must be a str, found int"),
    "not an object": ("hellaswag", '["a list"]\n', "line 1: a JSON object is needed, found list"),
    "hellaswag without endings": ("hellaswag", '{"activity_label": "a", "ctx": "b", "label": 0}\n',
                                  "line 1: field 'endings' is missing"),
    "kaggle header": ("kaggle_science_exam", "id,prompt,A,B,C,answer\n0,q,a,b,c,A\n",
                      "line 1: columns D, E missing from the header"),
    "kaggle answer": ("kaggle_science_exam", "id,prompt,A,B,C,D,E,answer\n0,q,a,b,c,d,e,F\n",
                      "line 2: field 'answer' must be one of A-E, found 'F'"),
    "empty file": ("multiple_choice", "\n\n", "no questions in the file"),
    "not UTF-8": ("multiple_choice", b"\xff\xfe\x00", "not UTF-8 text"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DEFECTS))
def test_defective_task_files_name_the_file_line_and_field(tmp_path, case):
    fmt, content, message = DEFECTS[case]
    path = tmp_path / "task.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TaskError) as err:
        read_questions(path, fmt)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_a_defective_task_file_stops_submit_before_any_stage(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=5)
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": "b", "answer": 1}\n')
    tree = tiny_spec(corpus, tmp_path / "runs", eval={"tasks": [{"name": "t", "path": str(task)}]})
    r = gptlab("submit", write_spec(tmp_path / "s.yaml", tree), "--lines")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"eval.tasks.0.path: {task}, line 2: field 'choices' is missing" in r.stderr
    assert not (tmp_path / "runs" / "stages").exists()
    tree["eval"]["tasks"] = [{"name": "t", "path": str(tmp_path / "nope.jsonl")}, {"name": "t", "format": "hellaswag"}]
    r = gptlab("validate", write_spec(tmp_path / "s.yaml", tree))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "eval.tasks: two tasks are named 't'" in r.stderr and "eval.tasks.1.path: format hellaswag needs" in r.stderr


def test_fewshot_examples_are_seeded_and_never_the_question():
    questions = [Question(str(i), f"q{i}", ("a", "b"), i % 2) for i in range(6)]
    ctx = fewshot_context(questions[2], 2, questions, 3, seed=1, delimiter=" ")
    assert ctx == fewshot_context(questions[2], 2, questions, 3, seed=1, delimiter=" ")
    shots = ctx.split("\n\n")
    assert len(shots) == 4 and shots[-1] == "q2" and all(not s.startswith("q2 ") for s in shots[:-1])
    assert all(s == f"{s[:2]} {'ab'[int(s[1]) % 2]}" for s in shots[:-1])  # each example solved: context + answer
    with pytest.raises(TaskError, match="num_fewshot: 6 examples asked, the file has 5 other questions"):
        fewshot_context(questions[0], 0, questions, 6, seed=1, delimiter=" ")


def test_next_line_rule():
    docs = ["def f(x):\n    return x + 1\n\nclass Thing:\n    name = 'a thing'\n    size = 12345678\n",
            "import os.path\nimport collections\nprint(os.path.sep)\n"]  # fmt: skip
    qs = next_line_questions(docs, 10, seed=3)
    assert qs == next_line_questions(docs, 10, seed=3)
    assert len(qs) == 4  # the pairs of consecutive usable (12-100 characters) lines
    for q in qs:
        assert len(set(q.choices)) == 4
        doc = next(d for d in docs if q.context + "\n" + q.choices[q.answer] + "\n" in d)
        assert doc  # the answer is the line that follows the context in its document


# ------------------------------------------------------------------------------ against lm-evaluation-harness


def word_questions(corpus, n: int, seed: int) -> list[dict]:
    """Which word continues a sentence of the corpus; four choices. Some contexts end in a space (the harness moves
    it into the continuation), some are empty (scored after BOS/EOS), some are longer than the block size."""
    rng = random.Random(seed)
    sentences = [s for f in sorted(corpus.glob("*.txt")) for s in f.read_text().split("\n") if s]
    words = sorted({w.strip(".") for s in sentences for w in s.split()})
    out = []
    for i in range(n):
        s = rng.choice(sentences).split()
        k = rng.randrange(1, len(s))
        context = " ".join(s[:k]) + (" " if i % 3 == 0 else "")
        if i % 10 == 5:
            context = ""
        elif i % 10 == 7:
            context = " ".join(rng.choice(sentences) for _ in range(4)) + " " + context
        answer = s[k].strip(".")
        choices = [answer, *rng.sample([w for w in words if w != answer], 3)]
        rng.shuffle(choices)
        out.append({"id": f"q{i}", "context": context, "choices": choices, "answer": choices.index(answer)})
    return out


LM_EVAL_TASK = """task: gptlab_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    corpus = make_corpus(tmp / "corpus", n_docs=30)
    tree = tiny_spec(corpus, tmp / "runs", tokenizer={"model_type": "bpe", "vocab_size": 160},
                     train={"max_steps": 60, "eval_interval": 30, "checkpoint_interval": 30})  # fmt: skip
    tree["name"] = "tasks"
    first = submit(write_spec(tmp / "spec.yaml", tree), quiet=True, poll_interval=0.3)
    task = write_jsonl(tmp / "words.jsonl", word_questions(corpus, 40, seed=5))
    tree["eval"]["tasks"] = [{"name": "words", "path": str(task)}]
    spec = write_spec(tmp / "spec.yaml", tree)
    second = submit(spec, quiet=True, poll_interval=0.3)
    return {"tmp": tmp, "corpus": corpus, "tree": tree, "spec": spec, "task": task, "first": first, "second": second}


@pytest.mark.slow
def test_adding_a_task_runs_only_its_stage_on_the_same_run(scored):
    first, second = scored["first"], scored["second"]
    assert first.ok and second.ok, [r.error for r in (*first.runs, *second.runs)]
    (run,) = second.runs
    assert run.run_id == first.runs[0].run_id  # recorded on the run that trained
    assert {label: str(s) for label, s in run.stages.items() if str(s) != "cached"} == {"task:words": "done"}
    client = MlflowClient(second.tracking_uri)
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["task/words/n"] == 40 and 0 <= metrics["task/words/acc"] <= 1 and "task/words/acc_norm" in metrics
    assert "final/val_loss" in metrics
    assert [a.path for a in client.list_artifacts(run.run_id, "tasks")] == ["tasks/words.jsonl"]
    # the table shows the task's columns
    r = gptlab("status", scored["spec"])
    assert r.returncode == 0 and "task/words/acc" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_a_changed_task_file_reruns_only_the_task_stage(scored, tmp_path):
    task = tmp_path / "words.jsonl"
    task.write_text(scored["task"].read_text().replace('"q0"', '"first"'))
    tree = json.loads(json.dumps(scored["tree"]))
    tree["eval"]["tasks"][0]["path"] = str(task)
    result = submit(write_spec(tmp_path / "spec.yaml", tree), quiet=True, poll_interval=0.3)
    assert result.ok
    assert {label for label, s in result.runs[0].stages.items() if str(s) != "cached"} == {"task:words"}


@pytest.mark.slow
def test_scores_equal_lm_evaluation_harness_on_the_exported_model(scored, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = scored["tmp"]
    r = gptlab("export", "tasks", "--runs-root", tmp / "runs", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    (tmp_path / "lm_eval_tasks").mkdir()
    (tmp_path / "lm_eval_tasks" / "words.yaml").write_text(LM_EVAL_TASK.format(path=scored["task"]))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", tasks=["gptlab_words"],
        task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks")), device="cpu", batch_size=1,
        log_samples=True,
    )  # fmt: skip
    theirs = {s["doc"]["id"]: s for s in out["samples"]["gptlab_words"]}
    (stage,) = [d for d in (tmp / "runs" / "stages").glob("task-*")
                if json.loads((d / "config.json").read_text())["locate"]["path"] == str(scored["task"])]  # fmt: skip
    ours = {p["id"]: p for p in map(json.loads, (stage / "words.jsonl").read_text().splitlines())}
    assert len(ours) == len(theirs) == 40
    for qid, p in ours.items():
        lls = [resp[0] for resp in theirs[qid]["filtered_resps"]]
        assert p["scores"] == pytest.approx(lls, abs=1e-4), qid
        assert (p["correct"], p["correct_norm"]) == (theirs[qid]["acc"] == 1.0, theirs[qid]["acc_norm"] == 1.0), qid
    results = out["results"]["gptlab_words"]
    metrics = json.loads((stage / "DONE.json").read_text())["result"]["metrics"]
    assert metrics["acc"] == results["acc,none"] and metrics["acc_norm"] == results["acc_norm,none"]


@pytest.mark.slow
def test_gptlab_evaluate_scores_a_run_and_a_pretrained_folder_alike(scored, tmp_path):
    tmp = scored["tmp"]
    r = gptlab("evaluate", "tasks", "--runs-root", tmp / "runs", "--task", scored["task"], "--format",
               "multiple_choice", "--name", "adhoc", "--limit", "25")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "task/adhoc/acc" in r.stdout and "25 questions" in r.stdout and "recorded on the run" in r.stdout
    client = MlflowClient(scored["second"].tracking_uri)
    run = client.get_run(scored["second"].runs[0].run_id)
    assert run.data.metrics["task/adhoc/n"] == 25
    assert "tasks/adhoc.jsonl" in [a.path for a in client.list_artifacts(run.info.run_id, "tasks")]
    assert gptlab("export", "tasks", "--runs-root", tmp / "runs", "--out", tmp_path / "hf").returncode == 0
    p = gptlab("evaluate", "--pretrained", tmp_path / "hf", "--task", scored["task"], "--format", "multiple_choice",
               "--name", "adhoc", "--limit", "25")  # fmt: skip
    assert p.returncode == 0, p.stderr
    acc = lambda out: next(line for line in out.splitlines() if "task/adhoc/acc " in line)  # the same model, read back
    assert (
        acc(p.stdout).split("│")[2].strip() == f"{run.data.metrics['task/adhoc/acc']:.4f}"
    )  # the same model, read back
    bad = gptlab("evaluate", "tasks", "--runs-root", tmp / "runs", "--task", tmp_path / "none.jsonl", "--format", "x")
    assert bad.returncode == 2 and "--format:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A BPE tokenizer and a random one-layer GPT (block size 24: long contexts are cut)."""
    import torch

    from llmcore.config import DataConfig, ModelConfig, TokenizerConfig
    from llmcore.model import GPT
    from llmcore.tokenizer import Tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("small")
    corpus = make_corpus(tmp / "corpus", n_docs=5)
    train_tokenizer(DataConfig(sources=[{"type": "files", "path": str(corpus)}]),
                    TokenizerConfig(model_type="bpe", vocab_size=120, num_threads=1), tmp / "tok", 0)  # fmt: skip
    tok = Tokenizer.load(tmp / "tok" / "tokenizer.model")
    torch.manual_seed(0)
    return corpus, tok, GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=24), tok.vocab_size)


def test_batched_scoring_equals_one_question_at_a_time(small):
    corpus, tok, model = small
    questions = [Question(str(i), q["context"], tuple(q["choices"]), q["answer"])
                 for i, q in enumerate(word_questions(corpus, 12, seed=1))]  # fmt: skip
    cfg = TaskConfig(name="w", format="multiple_choice")
    batched = score_task(model, tok, questions, cfg, 0, batch_size=16)
    single = score_task(model, tok, questions, cfg, 0, batch_size=1)
    for a, b in zip(batched.predictions, single.predictions):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert batched.metrics == single.metrics


def test_context_and_continuation_split_as_the_harness_own_encode_pair(small):
    from lm_eval.api.model import TemplateLM

    _, tok, _ = small

    class Harness:  # what _encode_pair reads of a decoder model
        backend = "causal"

        def tok_encode(self, text, **kwargs):
            return tok.encode(text)

    pairs = [("Nothing ", "else"), ("Nothing", " else"), ("The cat\n\n", "sat."), ("a  \t", " b"), ("x", "yz")]
    for context, continuation in pairs:
        assert encode_pair(tok, context, continuation) == TemplateLM._encode_pair(Harness(), context, continuation)
    ctx, cont = encode_pair(tok, "Nothing ", "else")
    assert ctx == tok.encode("Nothing") and ctx + cont == tok.encode("Nothing else")  # the space moved


def test_map3_is_scored_for_the_kaggle_format_only(small):
    _, tok, model = small
    questions = [Question(str(i), f"Question: q{i}\nAnswer:", ("alpha", "beta", "gamma", "delta", "eps"), i % 5)
                 for i in range(6)]  # fmt: skip
    kaggle = score_task(model, tok, questions, TaskConfig(name="k", format="kaggle_science_exam"), 0)
    want = sum(map_at_3(p["scores"], p["answer"]) for p in kaggle.predictions) / 6
    assert kaggle.metrics["map3"] == pytest.approx(want) and kaggle.metrics["n"] == 6
    plain = score_task(model, tok, questions, TaskConfig(name="m", format="multiple_choice"), 0)
    assert "map3" not in plain.metrics and all("map3" not in p for p in plain.predictions)
