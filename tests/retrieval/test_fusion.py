"""Fusion against scores computed by hand."""

import pytest

from retrieval.fusion import convex_fusion, fuse, min_max, rrf_fusion


def test_min_max_scales_to_unit_interval():
    assert min_max([("a", 10.0), ("b", 5.0), ("c", 0.0)]) == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert min_max([("a", 3.0), ("b", 3.0)]) == {"a": 1.0, "b": 1.0}
    assert min_max([]) == {}


def test_convex_fusion_matches_hand_computation():
    lexical = [("a", 12.0), ("b", 6.0), ("c", 2.0)]  # normalized: a 1.0, b 0.4, c 0.0
    dense = [("b", 0.9), ("d", 0.7), ("a", 0.5)]  # normalized: b 1.0, d 0.5, a 0.0
    fused = dict(convex_fusion(lexical, dense, alpha=0.25))
    assert fused["a"] == pytest.approx(0.75 * 1.0 + 0.25 * 0.0)
    assert fused["b"] == pytest.approx(0.75 * 0.4 + 0.25 * 1.0)
    assert fused["c"] == pytest.approx(0.0)
    assert fused["d"] == pytest.approx(0.25 * 0.5)
    assert [cid for cid, _ in convex_fusion(lexical, dense, alpha=0.25)] == ["a", "b", "d", "c"]


def test_convex_fusion_extremes_reduce_to_one_retriever():
    lexical = [("a", 3.0), ("b", 2.0)]
    dense = [("b", 0.9), ("a", 0.1)]
    assert [c for c, _ in convex_fusion(lexical, dense, alpha=0.0)] == ["a", "b"]
    assert [c for c, _ in convex_fusion(lexical, dense, alpha=1.0)] == ["b", "a"]
    with pytest.raises(ValueError):
        convex_fusion(lexical, dense, alpha=1.5)


def test_rrf_matches_hand_computation():
    fused = dict(rrf_fusion([("a", 9.0), ("b", 8.0)], [("b", 0.9), ("c", 0.8)], k=60))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 62)
    assert [c for c, _ in rrf_fusion([("a", 1.0), ("b", 0.5)], [("b", 1.0), ("c", 0.5)], k=60)] == ["b", "a", "c"]


def test_fuse_dispatches_by_name_and_refuses_an_unknown_one():
    """An unknown fusion name is an error naming the allowed values, never a silent convex fallback."""
    lexical, dense = [("a", 3.0), ("b", 2.0)], [("b", 0.9), ("a", 0.1)]
    assert fuse(lexical, dense, fusion="convex", alpha=1.0, rrf_k=60) == convex_fusion(lexical, dense, 1.0)
    assert fuse(lexical, dense, fusion="rrf", alpha=1.0, rrf_k=60) == rrf_fusion(lexical, dense, k=60)
    with pytest.raises(ValueError, match="'convex' or 'rrf', got 'max'"):
        fuse(lexical, dense, fusion="max", alpha=0.5, rrf_k=60)  # type: ignore[arg-type]
