"""The converter's quality report on real tiny models: KL, top-1 agreement, perplexity, chunking, files.

The CPU backend takes about a second for a 64-token forward pass through the 151,936-row output head,
so the tests score a prefix of the calibration text (`max_tokens`) rather than all of it.
"""

from __future__ import annotations

import json
import math
import re
import weakref

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import qwen_mlx
from qwen_mlx.convert.report import (
    CALIBRATION_FILE,
    REPORT_FILE,
    calibration_ids,
    compare,
    format_report,
    human_size,
    next_token_logprobs,
    quality_report,
    write_report,
)
from qwen_mlx.quant import bits_per_weight

SCORED_TOKENS = 64


def model_bytes(model) -> int:
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def wide(checkpoint):
    return checkpoint("dense_wide")


@pytest.fixture(scope="module")
def quantized_reports(wide) -> dict[int, dict]:
    """Reports for 8- and 4-bit dense_wide against its float32 source."""
    source = qwen_mlx.load(wide)
    reports = {}
    for bits in (8, 4):
        result = qwen_mlx.load(wide, quantize=bits, group_size=64)
        reports[bits] = quality_report(
            source,
            result,
            wide / "tokenizer.json",
            bits_per_weight=bits_per_weight(result),
            size_bytes=model_bytes(result),
            max_tokens=SCORED_TOKENS,
        )
    return reports


def test_calibration_text_covers_several_scripts_and_tokenizes_to_a_few_hundred_tokens(wide) -> None:
    text = CALIBRATION_FILE.read_text(encoding="utf-8")
    for script, pattern in {
        "CJK ideographs": r"[\u4e00-\u9fff]",
        "kana": r"[\u3040-\u30ff]",
        "Cyrillic": r"[\u0400-\u04ff]",
        "Latin accents": r"[éßñ]",
        "Python": r"\ndef \w+\(",
        "math": r"[∫≥²]",
    }.items():
        assert re.search(pattern, text), f"calibration text has no {script}"

    ids = calibration_ids(wide / "tokenizer.json")
    assert 300 <= len(ids) <= 1000, len(ids)
    assert calibration_ids(wide / "tokenizer.json", max_tokens=10) == ids[:10]

    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(wide / "tokenizer.json")).decode(ids) == text


def test_compare_matches_hand_computed_metrics() -> None:
    source = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    result = np.array([[0.2, 0.5, 0.3], [0.2, 0.7, 0.1], [0.4, 0.4, 0.2]])
    ids = [0, 1, 2]  # the last row has no next token and is not scored
    metrics = compare(mx.array(np.log(source), mx.float32), mx.array(np.log(result), mx.float32), ids)

    kl = (source[:2] * np.log(source[:2] / result[:2])).sum(axis=-1)
    assert metrics["tokens"] == 2
    assert metrics["kl_mean"] == pytest.approx(kl.mean(), rel=1e-5)
    assert metrics["kl_max"] == pytest.approx(kl.max(), rel=1e-5)
    assert metrics["top1_agreement"] == 0.5
    assert metrics["perplexity_source"] == pytest.approx(math.exp(-(np.log(0.2) + np.log(0.3)) / 2), rel=1e-5)
    assert metrics["perplexity_result"] == pytest.approx(math.exp(-(np.log(0.5) + np.log(0.1)) / 2), rel=1e-5)
    assert all(type(value) in (float, int) for value in metrics.values())


def test_compare_treats_zero_source_probability_as_zero_kl() -> None:
    source = mx.array([[0.0, -math.inf], [0.0, -math.inf]])
    result = mx.log(mx.array([[0.5, 0.5], [0.5, 0.5]]))
    metrics = compare(source, result, [0, 0])
    assert metrics["kl_mean"] == pytest.approx(math.log(2), rel=1e-6)


def test_source_against_itself_costs_nothing_and_is_released_before_the_result_loads(wide) -> None:
    loaded = []

    def load_source():
        loaded.append(weakref.ref(model := qwen_mlx.load(wide)))
        return model

    def load_result():
        assert loaded and loaded[0]() is None, "the source model is still alive when the result loads"
        return qwen_mlx.load(wide)

    report = quality_report(
        load_source, load_result, wide / "tokenizer.json", bits_per_weight=32.0, size_bytes=1, max_tokens=48
    )
    assert report["calibration_tokens"] == 48 and report["tokens"] == 47
    assert abs(report["kl_mean"]) <= 1e-6 and abs(report["kl_max"]) <= 1e-6
    assert report["top1_agreement"] == 1.0
    assert report["perplexity_source"] == report["perplexity_result"]


def test_4_bits_cost_more_than_8_bits(quantized_reports) -> None:
    eight, four = quantized_reports[8], quantized_reports[4]
    assert four["kl_mean"] > eight["kl_mean"] > 0, (four["kl_mean"], eight["kl_mean"])
    assert four["kl_max"] >= four["kl_mean"] and eight["kl_max"] >= eight["kl_mean"]
    assert eight["top1_agreement"] >= four["top1_agreement"]
    assert four["bits_per_weight"] < eight["bits_per_weight"]
    for report in (eight, four):
        assert report["calibration_tokens"] == SCORED_TOKENS and report["tokens"] == SCORED_TOKENS - 1
        for name in ("perplexity_source", "perplexity_result"):
            assert math.isfinite(report[name]) and report[name] > 0, (name, report[name])
    assert eight["perplexity_source"] == four["perplexity_source"]


def test_report_round_trips_through_json_and_formats_its_numbers(quantized_reports, tmp_path) -> None:
    report = quantized_reports[4]
    path = write_report(report, tmp_path)
    assert path == tmp_path / REPORT_FILE
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.startswith('{\n  "')
    with path.open(encoding="utf-8") as file:
        assert json.load(file) == report

    write_report(dict(report, kl_max=math.inf), tmp_path)  # replaces the file; JSON has no inf
    assert json.loads(path.read_text(encoding="utf-8"))["kl_max"] is None
    assert [p.name for p in tmp_path.iterdir()] == [REPORT_FILE]

    table = format_report(report)
    for expected in (
        f"{report['bits_per_weight']:.2f}",
        human_size(report["size_bytes"]),
        f"{report['kl_mean']:.4g}",
        f"{report['kl_max']:.4g}",
        f"{report['top1_agreement'] * 100:.1f}%",
        f"{report['perplexity_source']:.2f} → {report['perplexity_result']:.2f}",
    ):
        assert expected in table, (expected, table)
    # One aligned column of values: every value starts at the same offset.
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in table.splitlines()}
    assert len(starts) == 1, table


def test_human_size_uses_binary_units() -> None:
    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.50 KiB"
    assert human_size(300 << 20) == "300.00 MiB"
    assert human_size(17 * (1 << 30) // 4) == "4.25 GiB"


def test_chunked_scoring_equals_one_shot_scoring(wide) -> None:
    model = qwen_mlx.load(wide)
    # 33 ids in chunks of 16: two full chunks after the first, and a last chunk of one token (no mask).
    ids = calibration_ids(wide / "tokenizer.json", max_tokens=33)
    chunked = next_token_logprobs(model, ids, chunk_size=16)
    one_shot = next_token_logprobs(model, ids, chunk_size=len(ids))
    assert chunked.shape == one_shot.shape == (33, model.args.vocab_size)
    assert chunked.dtype == mx.float32
    # Log-probs, not logits: each row's probabilities sum to one.
    assert np.allclose(np.array(mx.exp(chunked).sum(axis=-1)), 1.0, atol=1e-4)
    diff = float(mx.abs(chunked - one_shot).max())
    assert diff <= 1e-4, diff
