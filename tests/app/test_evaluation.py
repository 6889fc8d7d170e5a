"""Retrieval evaluation: metrics against an oracle, BEIR parsing, an end-to-end run with tuning, SQuAD recall."""

import json

import pytest
from typer.testing import CliRunner

from app.settings import Settings
from ingestion.documents import Chunk
from app.evaluation.chunking import Question, answer_recall, chunk_body, squad_articles
from app.evaluation.retrieval import evaluate
from app.evaluation.scoring import latency_summary, load_qrels, load_queries, score_rankings
from retrieval.hybrid import Hit

DOCS = {
    "d1": ("Photosynthesis in plants", "Chlorophyll in leaves absorbs sunlight. Plants turn carbon dioxide and water "
           "into glucose and oxygen during photosynthesis."),
    "d2": ("Volcanic eruptions", "Magma rises through the crust and erupts as lava. Volcanic ash clouds disrupt "
           "air travel for days."),
    "d3": ("The French Revolution", "In 1789 the Bastille was stormed in Paris. The monarchy of Louis XVI fell and a "
           "republic was declared."),
    "d4": ("Black holes", "A black hole bends spacetime so strongly that not even light escapes its event horizon."),
    "d5": ("Sourdough baking", "A sourdough starter of wild yeast and lactic acid bacteria leavens bread slowly."),
    "d6": ("Honey bees", "Worker bees dance to tell the hive where flowers with nectar are found."),
}
QUERIES = {"q1": "How do plants make oxygen from sunlight?", "q2": "What happened at the Bastille in 1789?",
           "q3": "Can light escape from a black hole?", "q4": "How is sourdough bread leavened?"}
QRELS = {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d4": 1}, "q4": {"d5": 1}}


def write_beir(folder):
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "title": t, "text": x, "metadata": {}}) + "\n"
                              for i, (t, x) in DOCS.items()))
    queries = folder / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    qrels = folder / "qrels.tsv"
    qrels.write_bytes(("query-id\tcorpus-id\tscore\r\n" + "".join(
        f"{q}\t{d}\t{s}\r\n" for q, docs in QRELS.items() for d, s in docs.items())).encode())
    return corpus, queries, qrels


def test_oracle_ranking_scores_one_and_missing_queries_score_zero():
    qrels = {"a": {"d1": 2, "d2": 1}, "b": {"d3": 1}}
    means, _ = score_rankings(qrels, {"a": ["d1", "d2", "x"], "b": ["d3"]})
    assert means == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    means, per_query = score_rankings(qrels, {"a": ["d1", "d2"]})  # "b" retrieved nothing
    assert per_query["b"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert means["ndcg@10"] == pytest.approx(0.5)
    assert score_rankings(qrels, {"a": ["x", "d1"]})[0]["mrr@10"] == pytest.approx(0.25)


def test_graded_ranking_scores_match_hand_computation():
    """NDCG@10 (linear gains, log2 discount), Recall@100 and MRR@10 of a tiny run, computed by hand."""
    qrels = {"a": {"d1": 2, "d2": 1}, "b": {"d3": 1, "d4": 1, "d5": 1}}
    means, per_query = score_rankings(qrels, {"a": ["x", "d2", "d1"], "b": ["d3", "y", "d4"]})
    # a: DCG = 1/log2(3) + 2/log2(4) = 1.630930, ideal = 2 + 1/log2(3) = 2.630930; first relevant at rank 2
    assert per_query["a"] == pytest.approx({"ndcg@10": 0.619906, "recall@100": 1.0, "mrr@10": 0.5}, abs=1e-6)
    # b: DCG = 1 + 1/log2(4) = 1.5, ideal = 1 + 1/log2(3) + 1/log2(4) = 2.130930; d5 never retrieved
    assert per_query["b"] == pytest.approx({"ndcg@10": 0.703918, "recall@100": 2 / 3, "mrr@10": 1.0}, abs=1e-6)
    assert means == pytest.approx({"ndcg@10": 0.661912, "recall@100": 5 / 6, "mrr@10": 0.75}, abs=1e-6)


def test_latency_summary_of_known_values():
    """p50 and p95 by linear interpolation between order statistics, rounded to 0.01 ms."""
    assert latency_summary([50, 10, 40, 20, 30]) == {"latency_p50_ms": 30.0, "latency_p95_ms": 48.0}
    assert latency_summary([1.0, 2.0]) == {"latency_p50_ms": 1.5, "latency_p95_ms": 1.95}
    assert latency_summary([]) == {"latency_p50_ms": 0.0, "latency_p95_ms": 0.0}


def test_beir_files_parse(tmp_path):
    _, queries, qrels = write_beir(tmp_path)
    assert load_qrels(qrels) == QRELS
    assert load_queries(queries) == QUERIES


def test_end_to_end_with_tuning_and_settings_pick_it_up(tmp_path, monkeypatch):
    corpus, queries, qrels = write_beir(tmp_path)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", retrieval_tuning=None)
    tuning, plot = tmp_path / "tuning.json", tmp_path / "curve.png"
    report = evaluate(corpus, queries, qrels, settings, cache_root=tmp_path / "cache", depth=20, split_name="tiny",
                      tune=True, tuning_out=tuning, plot_out=plot)

    assert set(report["methods"]) >= {"bm25", "dense", "hybrid", "hybrid_rrf"}
    assert report["methods"]["dense"]["recall@100"] == 1.0  # 6 documents: every one is retrieved
    assert report["methods"]["hybrid"]["ndcg@10"] >= 0.9  # four easy questions
    assert report["queries"] == 4 and report["documents"] == 6 and not report["index"]["reused"]

    written = json.loads(tuning.read_text())
    assert written["fusion"] in ("convex", "rrf") and 0 <= written["fusion_alpha"] <= 1
    assert written["dataset"] == "tiny" and written["queries"] == 4 and plot.stat().st_size > 1000
    assert written["candidates"] in (5, 10, 20) and report["hybrid"]["candidates"] == written["candidates"]
    picked = Settings(_env_file=None, retrieval_tuning=tuning)
    assert (picked.fusion, picked.fusion_alpha, picked.rrf_k) == (written["fusion"], written["fusion_alpha"],
                                                                  written["rrf_k"])
    monkeypatch.setenv("RAG_FUSION_ALPHA", "0.123")  # an explicit setting wins over the file
    assert Settings(_env_file=None, retrieval_tuning=tuning).fusion_alpha == 0.123

    # The CLI reuses the cached index (same corpus and settings) and writes the JSON report.
    from app.cli import cli

    out = tmp_path / "report.json"
    monkeypatch.setenv("RAG_RETRIEVAL_TUNING", "none")
    result = CliRunner().invoke(cli, ["eval", "retrieval", "--corpus", str(corpus), "--queries", str(queries),
                                      "--qrels", str(qrels), "--data-dir", str(next((tmp_path / "cache").iterdir())),
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| hybrid |" in result.output
    assert json.loads(out.read_text())["index"]["reused"] is True


def test_settings_reject_a_bad_tuning_file(tmp_path):
    bad = tmp_path / "tuning.json"
    bad.write_text(json.dumps({"fusion": "max"}))
    with pytest.raises(ValueError, match="RAG_RETRIEVAL_TUNING"):
        Settings(_env_file=None, retrieval_tuning=bad)
    assert Settings(_env_file=None, retrieval_tuning=tmp_path / "absent.json").tuned_fields == {}


def test_squad_articles_and_answer_recall(tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "Super_Bowl", "paragraphs": [
        {"context": "The game was played in Santa Clara.", "qas": [
            {"id": "a", "question": "Where?", "answers": [{"text": "Santa Clara", "answer_start": 23}]}]},
        {"context": "Denver won.", "qas": [{"id": "b", "question": "Who won?", "answers": [{"text": "Denver"}]}]},
    ]}]}))
    documents, questions = squad_articles(squad)
    assert documents[0].title == "Super Bowl" and documents[0].text.count("\n\n") == 1 and len(questions) == 2

    def chunk(cid, text):
        return Chunk(cid, "squad-000", text, "", 0, 5, "", "", "")

    bodies = {c.chunk_id: chunk_body(c, "Super Bowl") for c in
              [chunk("c1", "Super Bowl\nThe game was played in santa clara."), chunk("c2", "Super Bowl\nDenver won.")]}
    hits = {"a": [Hit("c2", 1.0), Hit("c1", 0.5)], "b": [Hit("c1", 1.0)]}
    qs = [Question("a", "squad-000", "Where?", ("Santa Clara",)), Question("b", "squad-000", "Who?", ("Denver",))]
    assert answer_recall(hits, qs, bodies, ks=(1, 2)) == {"recall@1": 0.0, "recall@2": 0.5}
    assert chunk_body(chunk("c3", "Super Bowl\nSuper Bowl 50"), "Super Bowl") == "Super Bowl 50"


def test_chunking_comparison_builds_both_indexes_with_the_same_limit(tmp_path):
    from app.evaluation.chunking import evaluate_chunking

    paragraphs = [" ".join(f"{title} fact number {i} is that {title.lower()} item {i} weighs {i * 7} grams."
                           for i in range(12)) for title in ("Granite", "Basalt", "Marble")]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "Rocks", "paragraphs": [
        {"context": text, "qas": [{"id": f"q{n}", "question": f"How much does {text.split()[0].lower()} item 3 weigh?",
                                   "answers": [{"text": "21 grams"}]}]} for n, text in enumerate(paragraphs)]}]}))
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", retrieval_tuning=None, chunk_max_tokens=64,
                        chunk_overlap_tokens=8)
    report = evaluate_chunking(squad, settings, cache_root=tmp_path / "cache")
    semantic, fixed = report["chunkers"]["semantic"], report["chunkers"]["fixed"]
    assert semantic["effective_limit_tokens"] == fixed["effective_limit_tokens"] == 64
    assert semantic["chunks"] > 1 and fixed["chunks"] > 1
    for entry in (semantic, fixed):
        for scores in entry["methods"].values():
            assert scores["recall@10"] == 1.0


def test_tuning_prefers_fewer_candidates_on_ties_and_records_the_depth():
    from app.evaluation.tuning import choose

    row = lambda n, score, **p: {"candidates": n, **p, "ndcg@10": score, "recall@100": 0.9, "mrr@10": 0.8}  # noqa: E731
    curve = {"convex": [row(50, 0.71, alpha=0.4), row(200, 0.71, alpha=0.5), row(200, 0.70, alpha=0.3)],
             "rrf": [row(50, 0.69, k=10), row(200, 0.70, k=60)]}
    assert choose(curve) == {"fusion": "convex", "candidates": 50, "fusion_alpha": 0.4, "rrf_k": 10,
                             "metrics": {"ndcg@10": 0.71, "recall@100": 0.9, "mrr@10": 0.8}}
    curve["rrf"].append(row(100, 0.72, k=5))
    curve["convex"].append(row(100, 0.715, alpha=0.45))
    assert choose(curve)["fusion"] == "rrf" and choose(curve)["candidates"] == 100
    assert choose(curve)["fusion_alpha"] == 0.45  # the best convex weight at the chosen depth


OPEN_CACHED_INDEX = """
import logging, sys, time
from pathlib import Path
from app.evaluation.indexes import open_index
from app.settings import Settings
from ingestion.documents import Document

def documents():
    time.sleep(3)  # a slow build: the other process arrives while this one is half-way
    return [Document(document_id="rocks", title="Rocks", text="Granite is an igneous rock. " * 20)]

logging.basicConfig(level=logging.INFO)
settings = Settings(_env_file=None, data_dir=Path(sys.argv[1]) / "data", retrieval_tuning=None)
index = open_index(settings, Path(sys.argv[1]) / "cache" / "entry", {"corpus": "rocks"}, documents, owned=True)
print("reused" if index.reused else "built", index.info["chunks"])
"""


def test_two_processes_opening_one_cached_index_take_turns(tmp_path):
    """Two evaluations started together on the same corpus (the grounding benchmark runs the adapter and the
    base model side by side) used to collide: the second saw the first one's half-built folder and failed
    ("holds data that is not an evaluation index") or wiped it. Now one builds and the other reuses."""
    import subprocess
    import sys

    from app.settings import REPO_ROOT

    script = tmp_path / "open_index.py"
    script.write_text(OPEN_CACHED_INDEX)
    processes = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO_ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in results]
    outcomes = sorted(out.split()[0] for out, _ in results)
    assert outcomes == ["built", "reused"]
    assert len({out.split()[1] for out, _ in results}) == 1  # the same chunks in both


def test_a_process_waiting_for_a_cache_entry_says_so(tmp_path):
    """The process that waits its turn logs what it waits for (it used to sit silent)."""
    import fcntl
    import subprocess
    import sys
    import threading

    from app.settings import REPO_ROOT

    script = tmp_path / "open_index.py"
    script.write_text(OPEN_CACHED_INDEX)
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / ".entry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process holds the entry
        process = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO_ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        safety = threading.Timer(120, lambda: fcntl.flock(lock, fcntl.LOCK_UN))  # never hang the suite
        safety.start()
        # the first matching line ends the scan; "" (EOF) ends it if the line never comes
        waited = next((line for line in iter(process.stderr.readline, "") if "waiting for another process" in line),
                      "")
        fcntl.flock(lock, fcntl.LOCK_UN)
        safety.cancel()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert str(tmp_path / "cache" / "entry") in waited
    assert out.split()[0] == "built"
