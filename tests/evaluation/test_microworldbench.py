"""Loading, normalisation and selection of MicroWorldBench files (on the synthetic set of ``bench_dir``).

Facts of the published files themselves are checked in ``test_published_microworldbench.py``.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from evaluation.microworldbench import LEVELS, RubricError, load_benchmark, parse_block, select_tasks


def test_all_tasks_load_with_known_defects_reported_once(bench):
    assert len(bench.tasks) == 16
    assert bench.anomaly_counts() == {"renumbered_criteria": 4, "criteria_count": 1, "string_weights": 3}
    by_dim = Counter(a.dimension for a in bench.anomalies if a.kind == "renumbered_criteria")
    assert by_dim == {"scientific": 1, "visual": 1, "instruction": 2}
    strings = {(a.index, a.dimension) for a in bench.anomalies if a.kind == "string_weights"}
    assert strings == {(1, "scientific"), (60, "scientific"), (126, "scientific")}
    four = [a for a in bench.anomalies if a.kind == "criteria_count"]
    assert (four[0].index, four[0].dimension) == (277, "instruction")
    assert len(bench.tasks[277].rubrics["instruction"]) == 4
    # one record per (task, dimension, kind): nothing reported twice
    keys = [(a.kind, a.index, a.dimension) for a in bench.anomalies]
    assert len(keys) == len(set(keys))
    assert Counter(t.level for t in bench.tasks.values()) == {
        "Cellular-level": 7,
        "Organ-level": 6,
        "Subcellular-level": 3,
    }


def test_tasks_carry_text_and_norm_weights(bench, bench_dir):
    raw = {t["index"]: t for t in json.loads((bench_dir / "MWBenchRubrics.json").read_text())}
    norm = {t["index"]: t for t in json.loads((bench_dir / "MWBenchRubrics_norm.json").read_text())}
    task = bench.tasks[1]
    assert task.task == raw[1]["task"] and task.task.startswith("Red blood cells flow through a brain capillary")
    assert task.requirement == raw[1]["requirement"]
    # weights are the norm file's (w1 is the number 1.0 there, the string "2.0" in the raw file; w2 the string "1.0")
    assert [c.weight for c in task.rubrics["scientific"]] == [
        float(norm[1]["rubrics_scientific"][f"w{k}"]) for k in range(1, 6)
    ]
    assert raw[1]["rubrics_scientific"]["w1"] == "2.0" and task.rubrics["scientific"][0].weight == 1.0
    assert norm[1]["rubrics_scientific"]["w2"] == "1.0" and task.rubrics["scientific"][1].weight == 1.0
    # renumbered block (task 2 instruction uses d11..d55) keeps order and texts
    block = norm[2]["rubrics_instruction"]
    assert [c.text for c in bench.tasks[2].rubrics["instruction"]] == [block[f"d{k}{k}"] for k in range(1, 6)]
    assert bench.tasks[126].rubrics["scientific"][3].weight == 1.0  # the weight written "1."


def test_parse_block_normalises_and_rejects():
    crit, anomalies = parse_block({"d11": "a", "s11": "+1", "w11": "0.5", "d22": "b", "s22": "-1", "w22": 1})
    assert [(c.text, c.sign, c.weight) for c in crit] == [("a", 1, 0.5), ("b", -1, 1.0)]
    assert {a.kind for a in anomalies} == {"renumbered_criteria", "criteria_count", "string_weights"}
    with pytest.raises(RubricError, match="s1"):
        parse_block({"d1": "a", "s1": "+2", "w1": 1})
    with pytest.raises(RubricError, match="lacks w1"):
        parse_block({"d1": "a", "s1": "+1"})
    with pytest.raises(RubricError, match="not a number"):
        parse_block({"d1": "a", "s1": "+1", "w1": "heavy"})
    with pytest.raises(RubricError, match="numbered"):
        parse_block({"d1": "a", "s1": "+1", "w1": 1, "d3": "c", "s3": "+1", "w3": 1})
    with pytest.raises(RubricError, match="positive"):
        parse_block({"d1": "a", "s1": "-1", "w1": 1})
    with pytest.raises(RubricError, match="unexpected key"):
        parse_block({"d1": "a", "s1": "+1", "w1": 1, "x": 2})


def test_selection(bench):
    assert [t.index for t in select_tasks(bench, limit=6)] == [1, 2, 3, 4, 5, 6]
    assert [t.index for t in select_tasks(bench, indices=[9, 3, 3])] == [3, 9]
    sub = select_tasks(bench, levels=["Subcellular-level"])
    assert len(sub) == 3 and {t.level for t in sub} == {"Subcellular-level"}
    # 8 of 16 tasks: quotas 3.5 cellular, 3 organ, 1.5 subcellular; the tie on the remainder goes to the first level
    sample = select_tasks(bench, sample=8, seed=7)
    assert Counter(t.level for t in sample) == {"Cellular-level": 4, "Organ-level": 3, "Subcellular-level": 1}
    assert sample == select_tasks(bench, sample=8, seed=7)
    assert sample != select_tasks(bench, sample=8, seed=8)
    with pytest.raises(ValueError, match="unknown task"):
        select_tasks(bench, indices=[0, 460])
    with pytest.raises(ValueError, match="unknown level"):
        select_tasks(bench, levels=["Tissue-level"])
    assert set(LEVELS) == {t.level for t in select_tasks(bench, sample=10)}


def test_url_source_downloads_once_into_cache(tmp_path, bench_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(bench_dir))
    requests: list[str] = []

    class Counting(handler.func):  # type: ignore[name-defined]
        def log_message(self, *args):  # silence and count
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(bench_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        first = load_benchmark(url, cache_dir=tmp_path)
        second = load_benchmark(url, cache_dir=tmp_path)
    finally:
        server.shutdown()
    assert len(first.tasks) == len(second.tasks) == 16
    assert len(requests) == 3  # the second load read the cache
    assert len(list(Path(tmp_path).rglob("*.json"))) == 3
