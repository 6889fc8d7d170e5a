"""The answerability cross-encoder: loading a LoRA + head folder onto its base, scoring, the registry, training.

Loading is tested on a tiny random BERT built here (with the bundled MiniLM's tokenizer); training runs a
few real steps on the bundled MiniLM over pairs retrieved from a tiny SQuAD file by the real pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.app.conftest import make_settings


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ingestion.embedder import resolve_embedding_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_embedding_model("bundled:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    out = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def trained_folder(base: Path, out: Path) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                      target_modules=["query", "key", "value", "dense"]))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    (out / "metadata.json").write_text(json.dumps({"base_model": str(base), "max_length": 64}))
    return model.eval()


def test_loaded_scorer_matches_the_trained_model(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    from retrieval.cross_encoder import CrossEncoderScorer

    folder = tmp_path / "ce"
    reference = trained_folder(tiny_base, folder)
    scorer = CrossEncoderScorer.load(folder, str(tiny_base))
    question = "How many vacation days do employees get?"
    texts = ["Employees get 28 vacation days.", "The meal allowance is 55 euros.", "Passwords need 14 characters."]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    encoded = tokenizer([question] * 3, texts, truncation="only_second", max_length=64, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        expected = torch.sigmoid(reference(**encoded).logits[:, 0]).tolist()
    scores = scorer.score(question, texts)
    assert scores == pytest.approx(expected, abs=1e-5)  # merged LoRA = LoRA on top of the base
    assert all(0.0 < s < 1.0 for s in scores) and len(set(scores)) == 3
    assert scorer.score(question, texts[1:2]) == pytest.approx(scores[1:2], abs=1e-5)  # batch-independent
    assert scorer.score(question, []) == []


def test_build_reranker_is_off_by_default_and_a_missing_one_fails_naming_the_setting(tmp_path):
    from app.container import build_reranker

    assert build_reranker(make_settings(tmp_path)) is None
    assert build_reranker(make_settings(tmp_path, reranker="none")) is None
    with pytest.raises(LookupError, match="RAG_RERANKER"):
        build_reranker(make_settings(tmp_path, reranker="missing", rerankers_dir=tmp_path / "nowhere"))


def squad_file(path: Path) -> Path:
    def article(title, paragraphs):
        return {"title": title, "paragraphs": paragraphs}

    data = {"version": "v2.0", "data": [
        article("Harbor", [
            {"context": "The harbor of Lumen opened in 1852. Its lighthouse is painted red and white.",
             "qas": [{"id": "h1", "question": "When did the harbor of Lumen open?", "is_impossible": False,
                      "answers": [{"text": "1852", "answer_start": 31}]},
                     {"id": "h2", "question": "When did the harbor of Lumen close?", "is_impossible": True,
                      "answers": [], "plausible_answers": [{"text": "1852", "answer_start": 31}]}]},
            {"context": "Ferries leave the harbor every hour for the islands of the bay.",
             "qas": [{"id": "h3", "question": "How often do ferries leave the harbor?", "is_impossible": False,
                      "answers": [{"text": "every hour", "answer_start": 26}]}]}]),
        article("Orchard", [
            {"context": "The orchard grows forty kinds of apples. Cider is pressed in October.",
             "qas": [{"id": "o1", "question": "When is cider pressed?", "is_impossible": False,
                      "answers": [{"text": "October", "answer_start": 61}]}]}]),
        article("Held_out", [
            {"context": "The museum shows maps of the old coast.",
             "qas": [{"id": "m1", "question": "What does the museum show?", "is_impossible": False,
                      "answers": [{"text": "maps of the old coast", "answer_start": 17}]}]}]),
    ]}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_training_publishes_a_reranker_the_service_loads(tmp_path, monkeypatch):
    from app.container import build_reranker
    from app.evaluation.indexes import corpus_opener
    from generation.adapters import AdapterRegistry
    from generation.finetune.answerability import RerankerConfig, train_reranker

    train = squad_file(tmp_path / "train.json")
    settings = make_settings(tmp_path / "data", rerankers_dir=tmp_path / "rerankers")
    config = RerankerConfig(name="tiny", train_files=[str(train)], exclude_articles=["Held_out"],
                            validation_articles=1, batch_size=2, epochs=1.0, eval_steps=1, max_length=64,
                            time_budget_minutes=2)
    ref = train_reranker(config, open_index=corpus_opener(settings, tmp_path / "cache"), root=tmp_path,
                         registry_root=tmp_path / "rerankers", cache_root=tmp_path / "cache")
    metadata = json.loads((ref.path / "metadata.json").read_text())
    assert metadata["base_model"] == "bundled:all-MiniLM-L6-v2" and metadata["kind"] == "cross-encoder"
    assert "Held_out" not in metadata["training_data"]["articles"]["validation"]
    assert metadata["training_data"]["pairs"]["train"] >= 3 and metadata["metrics"]["steps"] >= 1
    assert (ref.path / "training_curve.png").stat().st_size > 0
    assert (ref.path / "adapter_model.safetensors").stat().st_size < 5_000_000  # LoRA + head, not the encoder
    assert AdapterRegistry(tmp_path / "rerankers").active("tiny") == "v1"
    scorer = build_reranker(settings.model_copy(update={"reranker": "tiny"}))
    scores = scorer.score("When is cider pressed?", ["Cider is pressed in October.", "Ferries leave hourly."])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)


def test_pairs_are_labelled_from_the_services_own_retrieval(tmp_path, embedder):
    from generation.finetune.answerability import RerankerConfig, build_pairs
    from app.evaluation.indexes import squad_corpus_index
    from generation.finetune.data import article_documents, file_digest, load_articles

    train = squad_file(tmp_path / "train.json")
    articles = load_articles([train])
    settings = make_settings(tmp_path / "data")
    index = squad_corpus_index(articles, settings, file_digest([train]), tmp_path / "cache").corpus()
    titles = {d.document_id: a.title for d, a in zip(article_documents(articles, "squad"), articles)}
    try:
        pairs = build_pairs(RerankerConfig(), [articles[0]], index, titles, seed=0)
    finally:
        index.close()
    by_question: dict[str, list[tuple[str, float]]] = {}
    for question, text, label in pairs:
        by_question.setdefault(question, []).append((text, label))
    opened = by_question["When did the harbor of Lumen open?"]
    assert any(label == 1.0 and "1852" in text for text, label in opened)
    assert any(label == 0.0 and "harbor" not in text.lower() for text, label in opened)  # another article
    closed = by_question["When did the harbor of Lumen close?"]  # unanswerable: nothing is positive
    assert closed and all(label == 0.0 for _, label in closed)
