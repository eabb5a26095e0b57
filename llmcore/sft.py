"""Task questions as training data: supervised fine-tuning with the loss on the answers.

A ``task`` source (``data.sources: [{type: task, path, format}]``) turns each question of a task file into one
training example, rendered exactly as the task scorer (``llmcore.tasks.score_task``) reads it, so training and
scoring see the same text:

* prompt: the question's context (``read_questions``'s, per format: ``multiple_choice`` and ``next_line`` the
  ``context`` field; ``kaggle_science_exam`` ``"Question: {prompt}\\nAnswer:"``; ``hellaswag`` the harness's
  preprocessed ``"{activity_label}: {ctx_a} {Ctx_b}"``);
* answer: the format's delimiter then the gold choice (``" " + choice``; ``"\\n" + line`` for ``next_line``),
  followed by EOS.

Context and answer are split into tokens as the scorer's ``encode_pair`` does (lm-evaluation-harness's
``_encode_pair``): the answer's tokens are those of ``context + answer`` past the context's own tokens. The mask
marks which tokens the loss counts: with ``data.mask_prompt`` (the default, as litgpt's ``SFTDataset``) the
answer's tokens and the EOS; without it every token. Examples are packed one after another into the split's
token stream after the text documents (there is no padding, so padding never counts); a training window may cut
an example, whose answer is then learnt without the start of its prompt.

Questions go to train or validation one by one, seeded (``is_val_question``). A ``next_line`` source without a
path derives its questions (``llmcore.tasks.next_line_questions``) from the *training* documents of the spec's
other sources, so a ``next_line`` task derived from the validation documents scores held-out text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmcore.config import DataConfig, TaskSource
from llmcore.corpus import CorpusError, split_pieces
from llmcore.tasks import DELIMITERS, Question, TaskError, encode_pair, next_line_questions, read_questions

#: Questions a derived next_line source takes when its ``limit`` is not set: every candidate pair of lines.
ALL_QUESTIONS = 10**9


def is_val_question(seed: int, source: int, index: int, val_fraction: float) -> bool:
    """Whether question ``index`` of source ``source`` is validation: hash (seed, source, index) to [0, 1)."""
    h = hashlib.blake2b(f"{seed}:task{source}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def render(q: Question, fmt: str) -> tuple[str, str]:
    """(prompt, answer) of a question: the scorer's context, and the delimiter + the gold choice."""
    return q.context, DELIMITERS[fmt] + q.choices[q.answer]


def source_questions(i: int, src: TaskSource, data: DataConfig, seed: int) -> list[Question]:
    """The questions of task source ``i``: its file's first ``limit``, or (next_line without a path) ``limit``
    questions derived from the training documents of the other sources. CorpusError names the source's field."""
    if src.path is None:
        documents = (text for split, text in split_pieces(data, seed) if split == "train")
        try:
            return next_line_questions(documents, src.limit or ALL_QUESTIONS, seed)
        except TaskError as e:
            raise CorpusError(f"data.sources.{i}", f"{e} (derived from the training documents)") from None
    try:
        questions = read_questions(src.path, src.format)
    except TaskError as e:
        raise CorpusError(f"data.sources.{i}.path", str(e)) from None
    return questions[: src.limit] if src.limit else questions


def check_task_sources(data: DataConfig) -> list[CorpusError]:
    """Read each task source's file through (a CorpusError names the file, line and field of its first bad row); a
    derived source is checked when its questions are drawn. ``llmcore.corpus.check_corpus`` checks the rest."""
    errors = []
    for i, src in enumerate(data.sources):
        if isinstance(src, TaskSource) and src.path is not None:
            try:
                source_questions(i, src, DataConfig(), 0)
            except CorpusError as err:
                errors.append(err)
    return errors


def task_examples(data: DataConfig, seed: int) -> Iterator[tuple[str, int, str, str]]:
    """``(split, source index, prompt, answer)`` for every question of every task source, in source order."""
    for i, src in enumerate(data.sources):
        if isinstance(src, TaskSource):
            for index, q in enumerate(source_questions(i, src, data, seed)):
                split = "val" if is_val_question(seed, i, index, data.val_fraction) else "train"
                yield (split, i, *render(q, src.format))


def encode_example(tok: Any, prompt: str, answer: str, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(token ids with EOS, loss mask (1: counts), answer tokens with EOS) of one example."""
    ctx, cont = encode_pair(tok, prompt, answer)
    ids = np.asarray([*ctx, *cont, tok.eos_id], dtype=np.uint32)
    mask = np.ones(len(ids), dtype=np.uint8)
    if mask_prompt:
        mask[: len(ctx)] = 0
    return ids, mask, len(cont) + 1


def describe_source(data: DataConfig, i: int) -> str:
    """``data.sources.1 (path/to/file.csv)``: a task source named for messages."""
    src = data.sources[i]
    where = str(Path(src.path).expanduser()) if src.path else "next_line questions derived from the training split"
    return f"data.sources.{i} ({where})"
