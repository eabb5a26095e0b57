"""Benchmark tasks: multiple-choice questions scored by log-likelihood, as lm-evaluation-harness scores them.

Each choice is scored by the summed log-probability of its continuation (``target_delimiter + choice``) given the
question's context. Context and continuation are split into tokens as the harness's ``_encode_pair`` does for
decoder models: trailing whitespace of the context moves to the continuation, and the continuation's tokens are
those of ``context + continuation`` past the context's own token count. A sequence longer than the block size
keeps its last ``block_size + 1`` tokens (the context is cut from the left). ``acc`` takes the argmax of the
sums, ``acc_norm`` of the sums divided by each choice's length in characters, and ``map3`` (the Kaggle LLM
Science Exam's MAP@3) scores 1, 1/2 or 1/3 when the answer is ranked first, second or third by its sum.

Task files (``read_questions``): ``multiple_choice`` JSONL (``context``, ``choices``, ``answer``; ``id``
optional), ``kaggle_science_exam`` CSV (``id, prompt, A, B, C, D, E, answer``), ``hellaswag`` JSONL
(preprocessed as the harness's ``hellaswag`` task), and ``next_line`` JSONL (as ``multiple_choice``, scored with
a newline before each choice; :func:`next_line_questions` derives such a task from a corpus).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcore.config import TASK_FORMATS, ConfigError, TaskConfig

FORMATS = TASK_FORMATS
#: The delimiter between context and choice, per format: lm-eval's default " "; a newline for the next line.
DELIMITERS = {"multiple_choice": " ", "kaggle_science_exam": " ", "hellaswag": " ", "next_line": "\n"}
FEWSHOT_DELIMITER = "\n\n"  # between few-shot examples and before the question, as the harness
DERIVED_QUESTIONS = 1000  # questions of a derived next_line task when its `limit` is not set
KAGGLE_OPTIONS = ("A", "B", "C", "D", "E")


class TaskError(ConfigError):
    """A task file that cannot be read as its format: names the file, the line and the field."""


@dataclass(frozen=True)
class Question:
    id: str
    context: str
    choices: tuple[str, ...]
    answer: int


# ------------------------------------------------------------------------------------------ task files


def preprocess_hellaswag(text: str) -> str:
    """lm-evaluation-harness's ``hellaswag`` text cleaning (WikiHow's bracketed artifacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}, line {lineno}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}, line {lineno}: a JSON object is needed, found {type(record).__name__}")
            yield lineno, record


def _field(path: Path, lineno: int, record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        have = ", ".join(sorted(record)) or "none"
        raise TaskError(f"{path}, line {lineno}: field '{name}' is missing (the record has: {have})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskError(f"{path}, line {lineno}: field '{name}' must be a {want}, found {type(value).__name__}")
    return value


def _choices(path: Path, lineno: int, record: dict[str, Any], name: str) -> tuple[str, ...]:
    choices = _field(path, lineno, record, name, list)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{path}, line {lineno}: field '{name}' must list at least two non-empty strings")
    return tuple(choices)


def _answer(path: Path, lineno: int, value: Any, n: int, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise TaskError(f"{path}, line {lineno}: field '{name}' must be an index from 0 to {n - 1}, found {value!r}")
    return value


def _multiple_choice(path: Path) -> Iterator[Question]:
    for lineno, r in _jsonl(path):
        context = _field(path, lineno, r, "context", str)
        choices = _choices(path, lineno, r, "choices")
        answer = _answer(path, lineno, _field(path, lineno, r, "answer", (int, str)), len(choices), "answer")
        yield Question(str(r.get("id", lineno)), context, choices, answer)


def _hellaswag(path: Path) -> Iterator[Question]:
    for lineno, r in _jsonl(path):
        if "ctx_a" in r or "ctx" not in r:
            ctx = _field(path, lineno, r, "ctx_a", str) + " " + _field(path, lineno, r, "ctx_b", str).capitalize()
        else:
            ctx = _field(path, lineno, r, "ctx", str)
        query = preprocess_hellaswag(_field(path, lineno, r, "activity_label", str) + ": " + ctx)
        endings = _choices(path, lineno, r, "endings")
        label = _answer(path, lineno, _field(path, lineno, r, "label", (int, str)), len(endings), "label")
        yield Question(str(r.get("ind", lineno)), query, tuple(preprocess_hellaswag(e) for e in endings), label)


def _kaggle(path: Path) -> Iterator[Question]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        missing = [c for c in ("id", "prompt", *KAGGLE_OPTIONS, "answer") if c not in columns]
        if missing:
            raise TaskError(f"{path}, line 1: column{'s' * (len(missing) > 1)} {', '.join(missing)} missing from the "
                            f"header (it has: {', '.join(reader.fieldnames or ()) or 'nothing'})")  # fmt: skip
        for row in reader:
            lineno = reader.line_num
            empty = [c for c in ("prompt", *KAGGLE_OPTIONS) if not (row.get(c) or "").strip()]
            if empty:
                raise TaskError(f"{path}, line {lineno}: field '{empty[0]}' is empty")
            answer = (row.get("answer") or "").strip()
            if answer not in KAGGLE_OPTIONS:
                raise TaskError(f"{path}, line {lineno}: field 'answer' must be one of A-E, found {answer!r}")
            yield Question(row["id"], f"Question: {row['prompt'].strip()}\nAnswer:",
                           tuple(row[c].strip() for c in KAGGLE_OPTIONS), KAGGLE_OPTIONS.index(answer))  # fmt: skip


READERS = {"multiple_choice": _multiple_choice, "next_line": _multiple_choice, "hellaswag": _hellaswag,
           "kaggle_science_exam": _kaggle}  # fmt: skip


def read_questions(path: str | Path, fmt: str) -> list[Question]:
    """Every question of a task file (all of them: few-shot examples come from the whole file); TaskError names
    the file, line and field of the first defect."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        questions = list(READERS[fmt](path))
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise TaskError(f"{path}: not a CSV file ({e})") from None
    if not questions:
        raise TaskError(f"{path}: no questions in the file")
    return questions


def write_questions(questions: Iterable[Question], path: Path) -> None:
    """Questions as ``multiple_choice`` / ``next_line`` JSONL (what a derived task writes)."""
    from llmcore.io import atomic_write_bytes

    lines = (json.dumps({"id": q.id, "context": q.context, "choices": list(q.choices), "answer": q.answer})
             for q in questions)  # fmt: skip
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def next_line_questions(documents: Iterable[str], n: int, seed: int, n_choices: int = 4) -> list[Question]:
    """A next-line task from held-out documents (the quickstart's task: it needs no download).

    The rule: a line is *usable* when it is 12 to 100 characters long once stripped (blank lines, lone brackets
    and very long lines are not); every pair of consecutive usable lines of one document is a candidate (context:
    the first line, answer: the second, both as written, indentation kept). ``n`` candidates are drawn with
    ``random.Random(seed)``; each gets ``n_choices - 1`` distractors drawn from the usable lines of all the
    documents (never equal to its answer or to each other), and the choices are shuffled by the same generator."""
    usable = lambda line: 12 <= len(line.strip()) <= 100
    pairs: list[tuple[str, str]] = []
    pool: dict[str, None] = {}
    for doc in documents:
        lines = doc.split("\n")
        for a, b in zip(lines, lines[1:]):
            if usable(a) and usable(b):
                pairs.append((a, b))
        pool.update((line, None) for line in lines if usable(line))
    lines = list(pool)
    if len(lines) < n_choices:
        raise TaskError(f"next_line: the validation documents have {len(lines)} usable lines; {n_choices} needed")
    rng = random.Random(seed)
    out = []
    for i in sorted(rng.sample(range(len(pairs)), min(n, len(pairs)))):
        context, answer = pairs[i]
        distractors: list[str] = []
        while len(distractors) < n_choices - 1:
            line = lines[rng.randrange(len(lines))]
            if line != answer and line not in distractors:
                distractors.append(line)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        out.append(Question(str(len(out)), context, tuple(choices), choices.index(answer)))
    return out


# -------------------------------------------------------------------------------------------- scoring


def fewshot_context(q: Question, index: int, questions: Sequence[Question], k: int, seed: int, delimiter: str) -> str:
    """The question's context after ``k`` solved examples (drawn with ``random.Random(f"{seed}:{index}")`` from
    the other questions of the file), each ``context + delimiter + answer``, separated by blank lines."""
    if k == 0:
        return q.context
    others = [i for i in range(len(questions)) if i != index]
    if k > len(others):
        raise TaskError(f"num_fewshot: {k} examples asked, the file has {len(others)} other questions")
    shots = [questions[i] for i in random.Random(f"{seed}:{index}").sample(others, k)]
    examples = [s.context + delimiter + s.choices[s.answer] for s in shots]
    return FEWSHOT_DELIMITER.join(examples) + FEWSHOT_DELIMITER + q.context


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness's ``_encode_pair`` for decoder models. An
    empty context is one token, as the harness's ``prefix_token_id``: the tokenizer's BOS, else its EOS."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        bos = tok.bos_id
        return [bos if bos is not None and bos >= 0 else tok.eos_id], tok.encode(continuation)
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx) :]


def loglikelihoods(model: Any, requests: Sequence[tuple[list[int], list[int]]], batch_size: int,
                   device: Any = "cpu") -> list[float]:  # fmt: skip
    """Summed log-probability of each continuation given its context, in padded batches of ``batch_size``
    sequences (longest first, as the harness orders them). Sequences keep their last ``block_size + 1`` tokens."""
    import torch
    import torch.nn.functional as F

    T = model.cfg.block_size
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise TaskError("a choice encodes to no tokens")
        if len(cont) > T:
            raise TaskError(f"a choice of {len(cont)} tokens does not fit the model's block size ({T})")
        rows.append((ctx + cont)[-(T + 1) :])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [0.0] * len(rows)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(rows[batch[0]]) - 1
            x = torch.zeros((len(batch), width), dtype=torch.long)
            select = torch.zeros((len(batch), width), dtype=torch.bool)  # the positions that predict a continuation
            targets = []
            for j, i in enumerate(batch):
                n, cont = len(rows[i]) - 1, requests[i][1]
                x[j, :n] = torch.tensor(rows[i][:-1])
                select[j, n - len(cont) : n] = True
                targets += cont
            logits, _ = model(x.to(device), select=select.to(device))  # (N, V): the continuations' positions only
            logp = F.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].double().cpu()
            at = 0
            for i in batch:
                k = len(requests[i][1])
                out[i] = float(picked[at : at + k].sum())
                at += k
    return out


def map_at_3(scores: Sequence[float], answer: int) -> float:
    """1, 1/2 or 1/3 when the answer is ranked first, second or third by score (ties: the earlier choice first)."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
    return 1.0 / (ranked.index(answer) + 1) if answer in ranked else 0.0


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal values, as numpy's argmax


@dataclass
class TaskScores:
    metrics: dict[str, float]  # acc, acc_norm, map3 (kaggle_science_exam), n
    predictions: list[dict[str, Any]]  # per question: id, scores, prediction, prediction_norm, answer, correct
    seconds: float


def score_task(model: Any, tok: Any, questions: Sequence[Question], cfg: TaskConfig, seed: int, batch_size: int = 16,
               device: Any = "cpu") -> TaskScores:  # fmt: skip
    """Score the first ``cfg.limit`` questions (few-shot examples from all of them)."""
    import time

    started = time.perf_counter()
    delimiter = DELIMITERS[cfg.format]
    scored = list(questions[: cfg.limit] if cfg.limit else questions)
    requests, owner = [], []
    for index, q in enumerate(scored):
        context = fewshot_context(q, index, questions, cfg.num_fewshot, seed, delimiter)
        for choice in q.choices:
            requests.append(encode_pair(tok, context, delimiter + choice))
            owner.append(index)
    lls = loglikelihoods(model, requests, batch_size, device)
    per_question: list[list[float]] = [[] for _ in scored]
    for index, ll in zip(owner, lls):
        per_question[index].append(ll)
    kaggle = cfg.format == "kaggle_science_exam"  # the one format scored by MAP@3 too
    predictions = []
    for q, scores in zip(scored, per_question):
        pred = argmax(scores)
        pred_norm = argmax([s / len(c) for s, c in zip(scores, q.choices)])
        predictions.append({"id": q.id, "scores": scores, "prediction": pred, "prediction_norm": pred_norm,
                            "answer": q.answer, "correct": pred == q.answer, "correct_norm": pred_norm == q.answer,
                            **({"map3": map_at_3(scores, q.answer)} if kaggle else {})})  # fmt: skip
    n = len(predictions)
    metrics = {"acc": sum(p["correct"] for p in predictions) / n,
               "acc_norm": sum(p["correct_norm"] for p in predictions) / n}  # fmt: skip
    if kaggle:
        metrics["map3"] = sum(p["map3"] for p in predictions) / n
    metrics["n"] = float(n)
    return TaskScores(metrics, predictions, time.perf_counter() - started)


def stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy over n questions (as the harness's acc_stderr)."""
    return math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")


# ------------------------------------------------------------------------------------- a task on a run


def derived_questions(data: Any, seed: int, cfg: TaskConfig) -> list[Question]:
    """A ``next_line`` task without a file: from the validation documents of the run's corpus (``data``)."""
    from llmcore.corpus import split_pieces

    documents = (text for split, text in split_pieces(data, seed) if split == "val")
    return next_line_questions(documents, cfg.limit or DERIVED_QUESTIONS, seed)


def evaluate_task(model: Any, tok: Any, questions: Sequence[Question], cfg: TaskConfig, seed: int,
                  out_dir: Path | None, batch_size: int = 16, device: Any = "cpu") -> dict[str, Any]:  # fmt: skip
    """Score a task and write its per-question predictions to ``<out_dir>/<name>.jsonl`` (unless ``out_dir`` is
    None); returns the result a task stage commits (its metrics and the seconds scoring took)."""
    from llmcore.io import atomic_write_bytes

    scores = score_task(model, tok, questions, cfg, seed, batch_size, device)
    if out_dir is not None:
        lines = "".join(json.dumps(p) + "\n" for p in scores.predictions)
        atomic_write_bytes(Path(out_dir) / f"{cfg.name}.jsonl", lines.encode("utf-8"))
    return {"name": cfg.name, "format": cfg.format, "metrics": scores.metrics, "seconds_scoring": scores.seconds,
            "questions_per_second": len(scores.predictions) / max(scores.seconds, 1e-9)}  # fmt: skip


def metric_names(name: str, fmt: str) -> list[str]:
    """The MLflow metrics a task logs on its run."""
    return [f"task/{name}/{m}" for m in ("acc", "acc_norm", *(("map3",) if fmt == "kaggle_science_exam" else ()), "n")]
