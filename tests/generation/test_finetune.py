"""Fine-tuning: shared-prefix rows train exactly like separate examples, answer-only labels, real Trainer runs."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from generation.adapters import AdapterRegistry, read_metadata
from generation.finetune.config import TrainConfig
from generation.finetune.data import (QA, Article, Paragraph, RowBuilder, build_rows, load_articles, load_rows,
                                      save_rows, share_prefix)
from generation.finetune.pipeline import answer_logits, build_metadata, compact_adapter, plot_curve
from generation.finetune.train import RowCollator, branch_mask, run_training
from generation.loading import load_generator
from generation.prompt import ABSTAIN_ANSWER, ContextChunk
from tests.generation.conftest import NATIVE

FACTS = [("Paris", "France"), ("Rome", "Italy"), ("Madrid", "Spain"), ("Lisbon", "Portugal"),
         ("Vienna", "Austria"), ("Berlin", "Germany")]


def make_articles() -> list[Article]:
    articles = []
    for number, (city, country) in enumerate(FACTS):
        text = f"{city} is the capital of {country}. It lies on a river and has many museums and old bridges."
        qas = [QA(f"q{number}a", f"What is the capital of {country}?", (city, city, "the city")),
               QA(f"q{number}b", f"Which country has {city} as its capital?", (country,)),
               QA(f"q{number}c", f"What is the capital of Atlantis {number}?", (), impossible=True)]
        articles.append(Article(f"Article_{country}", [Paragraph(text, qas)]))
    return articles


def stub_retrieve(articles: list[Article]):
    """Stands in for the service's retriever: every other article's paragraph, in a fixed order."""
    chunks = [ContextChunk(text=f"{a.display_title}\n{a.paragraphs[0].context}", chunk_id=f"c{i}",
                           document_id=a.title) for i, a in enumerate(articles)]
    return lambda question, k: chunks[:k]


@pytest.fixture(scope="module")
def rows(smol_tokenizer):
    articles = make_articles()
    builder = RowBuilder(tokenizer=smol_tokenizer, retrieve=stub_retrieve(articles), context_window=1024,
                         max_new_tokens=32, max_seq_length=1024, context_chunks=(2, 3), gold_only_fraction=0.3,
                         no_gold_fraction=0.2, questions_per_row=3, impossible_per_row=1)
    items = [(a, p) for a in articles for p in a.paragraphs]
    return build_rows(builder, items, n_rows=6, seed=0), builder, articles


def test_best_answer_is_the_most_frequent_then_shortest() -> None:
    assert QA("x", "q", ("Paris", "Paris", "the city")).best_answer == "Paris"
    assert QA("x", "q", ("Paris city", "Paris")).best_answer == "Paris"


def test_rows_mask_the_prompt_and_keep_answers_only(rows, smol_tokenizer) -> None:
    built, _, _ = rows
    assert len(built) == 6
    for row in built:
        assert len(row.prefix) > 20 and len(row.branches) >= 2
        for branch in row.branches:
            assert len(branch["ids"]) == len(branch["labels"])
            assert branch["labels"][0] == -100  # a branch starts with question tokens, never a label
            labelled = [i for i, t in enumerate(branch["labels"]) if t != -100]
            assert labelled == list(range(labelled[0], len(branch["ids"])))  # the answer is the branch tail
            assert [branch["ids"][i] for i in labelled] == [branch["labels"][i] for i in labelled]
            answer = smol_tokenizer.decode([branch["labels"][i] for i in labelled], skip_special_tokens=True)
            assert answer.strip() == ABSTAIN_ANSWER or answer.strip().endswith("]")
            question = smol_tokenizer.decode(branch["ids"][:labelled[0]])
            assert "Question:" in smol_tokenizer.decode(row.prefix) + question


def test_gold_paragraph_is_cited_and_unanswerable_abstains(smol_tokenizer) -> None:
    articles = make_articles()
    builder = RowBuilder(tokenizer=smol_tokenizer, retrieve=stub_retrieve(articles), context_window=1024,
                         max_new_tokens=32, max_seq_length=2048, context_chunks=(3, 3), gold_only_fraction=0.0,
                         no_gold_fraction=0.0, questions_per_row=3, impossible_per_row=1)
    article = articles[2]
    row = builder.build(article, article.paragraphs[0], random.Random(3))
    answers = {smol_tokenizer.decode([t for t in b["labels"] if t != -100], skip_special_tokens=True).strip()
               for b in row.branches}
    context = smol_tokenizer.decode(row.prefix)
    gold_ref = next(n for n in (1, 2, 3) if f"[{n}] {article.display_title} Madrid" in context)
    assert answers == {f"Madrid [{gold_ref}]", f"Spain [{gold_ref}]", ABSTAIN_ANSWER}
    assert context.count("Madrid") == 1  # distractors never hold the gold paragraph


def test_off_topic_rows_hold_other_articles_only_and_abstain(smol_tokenizer) -> None:
    articles = make_articles()
    builder = RowBuilder(tokenizer=smol_tokenizer, retrieve=stub_retrieve(articles), context_window=1024,
                         max_new_tokens=32, max_seq_length=2048, context_chunks=(3, 3), gold_only_fraction=0.0,
                         no_gold_fraction=0.0, off_topic_fraction=1.0, questions_per_row=3, impossible_per_row=1)
    article = articles[0]  # the stub retrieves its paragraph first: off_topic must skip it
    row = builder.build(article, article.paragraphs[0], random.Random(3))
    assert row.kind == "off_topic"
    answers = {smol_tokenizer.decode([t for t in b["labels"] if t != -100], skip_special_tokens=True).strip()
               for b in row.branches}
    assert answers == {ABSTAIN_ANSWER}
    context = smol_tokenizer.decode(row.prefix)
    assert "Paris" not in context
    assert all(city in context for city, _ in FACTS[1:4])  # the next three articles the stub ranks


def test_off_topic_rows_skip_other_articles_that_hold_the_answer(smol_tokenizer) -> None:
    """An other article's chunk that happens to hold the answer would make "I don't know." a wrong label."""
    articles = make_articles()
    rome = articles[1].paragraphs[0]
    articles[1] = Article(articles[1].title, [Paragraph(rome.context + " Trains run from Rome to Paris.", rome.qas)])
    builder = RowBuilder(tokenizer=smol_tokenizer, retrieve=stub_retrieve(articles), context_window=1024,
                         max_new_tokens=32, max_seq_length=2048, context_chunks=(3, 3), gold_only_fraction=0.0,
                         no_gold_fraction=0.0, off_topic_fraction=1.0, questions_per_row=3, impossible_per_row=1)
    row = builder.build(articles[0], articles[0].paragraphs[0], random.Random(3))
    context = smol_tokenizer.decode(row.prefix)
    assert "Paris" not in context and "Rome" not in context
    assert all(city in context for city, _ in FACTS[2:5])


def test_off_topic_fraction_is_validated_with_the_others(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nbase_model: b\ngold_only_fraction: 0.5\nno_gold_fraction: 0.2\n"
                    "off_topic_fraction: 0.4\n")
    with pytest.raises(ValueError, match=f"^{path}: .*off_topic_fraction"):
        TrainConfig.from_yaml(path)


def test_shared_prefix_row_gives_each_example_its_own_logits(rows, tiny_model_dir) -> None:
    built, builder, articles = rows
    loaded = load_generator(str(tiny_model_dir), context_window=NATIVE)
    article = articles[0]
    examples = [builder._example(qa, [ContextChunk(text=article.paragraphs[0].context, chunk_id="gold")], "gold")
                for qa in article.paragraphs[0].qas]
    row = share_prefix(examples, max_tokens=4096)
    packed = answer_logits(loaded.model, RowCollator(pad_id=0)([row]))
    alone = []
    with torch.no_grad():
        for ids, labels in examples:
            logits = loaded.model(torch.tensor([ids])).logits[0, :-1]  # (L-1, V)
            alone.append(logits[torch.tensor(labels[1:]) != -100])
    torch.testing.assert_close(packed, torch.cat(alone), atol=2e-5, rtol=1e-4)


def test_branch_mask_shapes_and_padding() -> None:
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    mask = branch_mask(segments)[0, 0]
    assert mask.shape == (6, 6)
    assert mask[3].tolist() == [True, True, True, True, False, False]  # prefix + own branch, causal
    assert mask[4].tolist() == [True, True, False, False, True, False]  # never another branch
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees itself only


def test_rows_cache_round_trip(rows, tmp_path) -> None:
    built, _, _ = rows
    save_rows(tmp_path / "rows.json", {"train": built}, {"key": "k"})
    loaded, info = load_rows(tmp_path / "rows.json")
    assert info == {"key": "k"}
    assert [r.to_json() for r in loaded["train"]] == [r.to_json() for r in built]


def test_squad_v2_and_jsonl_loading(tmp_path) -> None:
    squad = {"data": [{"title": "T_1", "paragraphs": [{"context": "Alpha beta.", "qas": [
        {"id": "a", "question": "What?", "answers": [{"text": "Alpha", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "Why?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    lines = [{"question": "Who?", "answer": "Gamma", "context": "Gamma was."},
             {"question": "When?", "answer": None, "context": "Gamma was."}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    articles = load_articles([tmp_path / "s.json", tmp_path / "s.json", tmp_path / "q.jsonl"])
    assert [a.title for a in articles] == ["T_1", ""]
    assert [(q.qid, q.impossible, q.answers) for q in articles[0].paragraphs[0].qas] == [
        ("a", False, ("Alpha",)), ("b", True, ())]  # the second copy of the file adds nothing
    assert [(q.question, q.impossible) for q in articles[1].paragraphs[0].qas] == [("Who?", False), ("When?", True)]


def tiny_config(**overrides) -> TrainConfig:
    values = dict(name="tiny", base_model="tiny", context_window=NATIVE, max_new_tokens=32, r=4, lora_alpha=8,
                  lora_dropout=0.0, learning_rate=5e-3, warmup_ratio=0.0, max_steps=8, batch_size=2,
                  grad_accumulation=1, eval_steps=4, logging_steps=1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_lora_training_lowers_loss_and_saves_a_reloadable_adapter(rows, tiny_model_dir, tmp_path) -> None:
    built, _, _ = rows
    config = tiny_config()
    result = run_training(config, str(tiny_model_dir), {"train": built, "validation": built[:2]}, tmp_path / "run")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert result.metrics["best_eval_loss"] is not None and result.metrics["examples_seen"] > 0
    assert 0 < result.trainable_params < result.total_params

    diff = compact_adapter(result, str(tiny_model_dir), built, config)
    assert diff is not None and diff < 1e-2  # stored as float16, same logits within tolerance
    weights = result.adapter_dir / "adapter_model.safetensors"
    assert weights.stat().st_size < 200_000
    metadata = build_metadata(config, result, {"data_sha256": "abc", "rows": {}, "examples": {}, "kinds": {},
                                               "articles": {}}, [tmp_path / "train.json"], diff)
    (result.adapter_dir / "metadata.json").write_text(json.dumps(metadata))
    plot_curve(result.log_history, result.adapter_dir / "training_curve.png", "tiny")
    ref = AdapterRegistry(tmp_path / "registry").publish("tiny", result.adapter_dir)
    assert ref.label == "tiny@v1" and (ref.path / "training_curve.png").stat().st_size > 1000
    meta = read_metadata(ref.path)
    assert meta["context_window"] == NATIVE and meta["rope_scaling"] is None
    assert meta["prompt_template_version"] and meta["training_data"]["sha256"] == "abc"

    reloaded = load_generator(str(tiny_model_dir), context_window=NATIVE, adapter_path=str(ref.path))
    merged = load_generator(str(tiny_model_dir), context_window=NATIVE, adapter_path=str(ref.path), merge_adapter=True)
    batch = RowCollator(pad_id=0)(built[:2])
    expected = answer_logits(result.model, batch)
    torch.testing.assert_close(answer_logits(reloaded.model, batch), expected, atol=1e-2, rtol=0)
    torch.testing.assert_close(answer_logits(merged.model, batch), answer_logits(reloaded.model, batch),
                               atol=1e-4, rtol=0)


def test_qlora_step_on_cpu_falls_back_from_paged_adamw(rows, tiny_model_dir, tmp_path, caplog) -> None:
    built, _, _ = rows
    config = tiny_config(method="qlora", max_steps=1, eval_steps=0, batch_size=1)
    with caplog.at_level(logging.WARNING):
        result = run_training(config, str(tiny_model_dir), {"train": built[:1]}, tmp_path / "run")
    assert result.metrics["steps"] == 1
    assert any("paged 8-bit AdamW needs CUDA" in r.message for r in caplog.records)
    assert any(type(m).__name__ == "Linear4bit" for m in result.model.modules())


def test_time_budget_stops_training(rows, tiny_model_dir, tmp_path) -> None:
    built, _, _ = rows
    config = tiny_config(max_steps=50, eval_steps=0, time_budget_minutes=1e-6)
    result = run_training(config, str(tiny_model_dir), {"train": built}, tmp_path / "run")
    assert result.metrics["stopped_by_time_budget"] and result.metrics["steps"] == 1


def test_config_rejects_unknown_keys(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nlearning_rat: 0.1\ntrain_files: [a]\n")
    with pytest.raises(ValueError, match="learning_rat"):
        TrainConfig.from_yaml(path)


def test_config_reads_yaml_exponents_as_numbers_and_names_a_wrongly_typed_setting(tmp_path) -> None:
    # PyYAML reads `1e-3` (no dot) as the string "1e-3"; handed on as is, it failed deep inside the optimizer
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nlearning_rate: 1e-3\ntrain_files: [a]\n")
    config = TrainConfig.from_yaml(path, {"r": "8", "time_budget_minutes": "2e1"})
    assert config.learning_rate == 0.001 and config.r == 8 and config.time_budget_minutes == 20.0
    with pytest.raises(ValueError, match=r"c\.yaml: r: .*'sixteen'"):
        TrainConfig.from_yaml(path, {"r": "sixteen"})
    with pytest.raises(ValueError, match=r"c\.yaml: method: .*'adalora'"):
        TrainConfig.from_yaml(path, {"method": "adalora"})
