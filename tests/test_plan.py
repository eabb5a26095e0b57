"""Planning: content-addressed stages shared across sweep points, stable keys, done detection."""

from __future__ import annotations

import pytest
from helpers import make_corpus, tiny_spec

from llmcore.io import write_commit_marker
from workflows.planning import canonical_hash, plan
from workflows.spec import load_spec_tree
from workflows.stages import STAGES


@pytest.fixture()
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus", n_docs=4)


def planned(tree, overrides=None):
    return plan(load_spec_tree(tree, "s.yaml", overrides))


def distinct(p, kind):
    return {r.stages[kind].key for r in p.runs}


def test_model_sweep_shares_tokenizer_and_shards(corpus, tmp_path):
    p = planned(tiny_spec(corpus, tmp_path / "runs", sweep={"model.n_layer": [1, 2], "train.lr": [1e-3, 3e-3]}))
    assert len(p.runs) == 4
    assert (len(distinct(p, "tokenizer")), len(distinct(p, "shards"))) == (1, 1)
    assert (len(distinct(p, "train")), len(distinct(p, "eval"))) == (4, 4)
    assert len(p.stages) == 1 + 1 + 4 + 4


def test_tokenizer_sweep_splits_everything_downstream(corpus, tmp_path):
    p = planned(tiny_spec(corpus, tmp_path / "runs", sweep={"tokenizer.vocab_size": [40, 64]}))
    assert [len(distinct(p, k)) for k in ("tokenizer", "shards", "train", "eval")] == [2, 2, 2, 2]


def test_eval_sweep_shares_training(corpus, tmp_path):
    p = planned(tiny_spec(corpus, tmp_path / "runs", sweep={"eval.temperature": [0.5, 1.0]}))
    assert [len(distinct(p, k)) for k in ("tokenizer", "shards", "train", "eval")] == [1, 1, 1, 2]


def test_keys_are_stable_and_track_exactly_what_a_stage_uses(corpus, tmp_path):
    tree = tiny_spec(corpus, tmp_path / "runs")
    a, b = planned(tree), planned(tree)
    assert [s.key for s in a.stages.values()] == [s.key for s in b.stages.values()]
    lr = planned(tree, ["train.lr=1e-2"]).runs[0].stages
    base = a.runs[0].stages
    assert [lr[k].key == base[k].key for k in ("tokenizer", "shards", "train", "eval")] == [True, True, False, False]
    # Settings that cannot change a stage's output do not change its key.
    same = planned(tree, ["data.num_workers=2", "train.time_budget_s=100", "site.max_workers=1"]).runs[0].stages
    assert all(same[k].key == base[k].key for k in base)


def test_a_key_hashes_kind_version_config_and_inputs_and_shared_stages_are_one_object(corpus, tmp_path):
    # Tokenizer and shards stages are keyed once per distinct data/tokenizer/seed: the keys must stay exactly
    # the hash of each stage's identity, so stage directories of earlier versions are still found.
    p = planned(
        tiny_spec(
            corpus,
            tmp_path / "runs",
            sweep={"tokenizer.vocab_size": [40, 64], "train.lr": [1e-3, 2e-3], "data.num_workers": [1, 2]},
        )
    )
    for key, s in p.stages.items():
        assert key == canonical_hash(
            {"kind": s.kind, "version": STAGES[s.kind].version, "config": s.config, "inputs": s.deps}
        )
        assert s.dir.name == f"{s.kind}-{key}"
    assert [len(distinct(p, k)) for k in ("tokenizer", "shards", "train", "eval")] == [2, 2, 4, 4]
    by_vocab = {}
    for r in p.runs:
        by_vocab.setdefault(r.spec.tokenizer.vocab_size, []).append(r.stages["shards"])
    assert all(all(s is group[0] for s in group) for group in by_vocab.values())
    assert all(p.stages[r.stages[k].key] is r.stages[k] for r in p.runs for k in r.stages)


def test_corpus_change_invalidates_the_tokenizer(corpus, tmp_path):
    tree = tiny_spec(corpus, tmp_path / "runs")
    before = planned(tree).runs[0].stages["tokenizer"].key
    (corpus / "doc000.txt").write_text("something else entirely\n")
    assert planned(tree).runs[0].stages["tokenizer"].key != before


def test_stage_is_done_only_with_its_commit_marker(corpus, tmp_path):
    stage = planned(tiny_spec(corpus, tmp_path / "runs")).runs[0].stages["tokenizer"]
    stage.dir.mkdir(parents=True)
    (stage.dir / "tokenizer.model").write_bytes(b"partial")
    assert not stage.done
    write_commit_marker(stage.dir, {"kind": "tokenizer"})
    assert stage.done
    assert stage.dir.parent == (tmp_path / "runs" / "stages").resolve()


def test_plan_warns_when_more_trainings_run_at_once_than_sqlite_forwarding_keeps_up_with(tmp_path):
    from helpers import gptlab, write_spec

    from workflows.store import SQLITE_CEILING

    tree = tiny_spec(make_corpus(tmp_path / "corpus"), tmp_path / "runs")
    tree["search"] = {"trials": SQLITE_CEILING + 1, "max_parallel": SQLITE_CEILING + 1,
                      "space": {"train.lr": {"log_uniform": [1e-3, 1e-2]}}}  # fmt: skip
    wide = gptlab("plan", write_spec(tmp_path / "wide.yaml", tree), cwd=tmp_path)
    assert wide.returncode == 0, wide.stderr
    assert f"Warning: {SQLITE_CEILING + 1} trainings at once is past" in wide.stdout
    tree["search"]["max_parallel"] = 4
    narrow = gptlab("plan", write_spec(tmp_path / "narrow.yaml", tree), cwd=tmp_path)
    assert "up to 4 training(s) at once" in narrow.stdout and "Warning" not in narrow.stdout
