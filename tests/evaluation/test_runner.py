"""Runner, CLI, reports, upstream import/export, and kill-and-resume without duplicate judge calls."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from evaluation.cli import eval_group
from evaluation.runner import import_upstream, rescore_upstream

INDICES = "1,2,3,60,277,319"


def _run_args(fake_judge, videos_dir, out, bench_dir, *extra):
    return [
        "run",
        "--videos",
        str(videos_dir),
        "--model-name",
        "tiny",
        "--out",
        str(out),
        "--benchmark",
        str(bench_dir),
        "--judge-base-url",
        fake_judge.base_url,
        "--judge-model",
        "fake-judge",
        "--index",
        INDICES,
        "--price-input",
        "2.5",
        "--price-output",
        "10",
        *extra,
    ]


def _table_rows(markdown: str, header: str) -> list[str]:
    section = markdown.split(header, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


def test_cli_run_writes_reports_and_resumes_from_cache(fake_judge, videos_dir, tmp_path, bench_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(eval_group, _run_args(fake_judge, videos_dir, out, bench_dir, "--limit", "6"))
    assert result.exit_code == 0, result.output
    assert fake_judge.state.total_answered == 18 and fake_judge.state.duplicates == 0
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["selected"] == report["coverage"]["valid"] == 6
    assert report["coverage"]["anomalies"]["renumbered_criteria"] == 4  # of the whole synthetic set
    assert [t["index"] for t in report["tasks"]] == [1, 2, 3, 60, 277, 319]
    overall = sum(t["score"] for t in report["tasks"]) / 6
    assert report["overall"]["mean"] == pytest.approx(overall)
    assert report["overall"]["ci_low"] <= overall <= report["overall"]["ci_high"]
    assert report["cost"]["requests"] == 18 and report["cost"]["cost_usd"] > 0
    md = (out / "report.md").read_text()
    table1 = _table_rows(md, "## Table 1")
    table2 = _table_rows(md, "## Table 2")
    assert "Organ-level" in table1[0] and "Scientific Accuracy" in table2[0]
    assert any(r.startswith("| **tiny** |") for r in table1) and any(
        r.startswith("| Veo3 (published) | 77.2 |") for r in table2
    )
    assert "Valid tasks: 6 / 6" in md
    for name in ("by_level.png", "by_dimension.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (900, 450)
    upstream = json.loads((out / "tiny_result.json").read_text())
    assert len(upstream) == 6 and len(upstream[0]["scientific_eval"]["parsed_result"]["scores"]) == 5

    again = CliRunner().invoke(eval_group, _run_args(fake_judge, videos_dir, out, bench_dir))
    assert again.exit_code == 0, again.output
    assert fake_judge.state.total_answered == 18  # everything came from the cache
    assert json.loads((out / "report.json").read_text())["overall"]["mean"] == pytest.approx(report["overall"]["mean"])

    compared = CliRunner().invoke(
        eval_group, ["compare", str(out), str(out / "report.json"), "--out", str(tmp_path / "cmp")]
    )
    assert compared.exit_code == 0, compared.output
    assert compared.output.count("| tiny | fake-judge | 6/6 |") == 2 and "| Veo3 (published) |" in compared.output
    assert (tmp_path / "cmp" / "by_level.png").is_file()


def test_upstream_export_imports_and_rescores_identically(fake_judge, videos_dir, tmp_path, bench_dir, bench):
    out = tmp_path / "run"
    assert CliRunner().invoke(eval_group, _run_args(fake_judge, videos_dir, out, bench_dir)).exit_code == 0
    rescored = rescore_upstream(out / "tiny_result.json", bench)
    original = json.loads((out / "report.json").read_text())
    assert rescored.model_name == "tiny"
    assert [s.score for s in rescored.scores] == pytest.approx([t["score"] for t in original["tasks"]])
    cli = CliRunner().invoke(
        eval_group,
        [
            "import-upstream",
            str(out / "tiny_result.json"),
            "--benchmark",
            str(bench_dir),
            "--out",
            str(tmp_path / "imp"),
        ],
    )
    assert cli.exit_code == 0, cli.output
    imported = json.loads((tmp_path / "imp" / "report.json").read_text())
    assert imported["overall"]["mean"] == pytest.approx(original["overall"]["mean"])


def test_upstream_defects_are_reported_not_scored_as_zero(tmp_path, bench):
    five = {"parsed_result": {"scores": [1, 1, 1, 1, 0], "reasoning": "x"}}
    items = [
        {"index": 1, "scientific_eval": five, "visual_eval": five, "instruction_eval": five},
        # short answer upstream would inflate: here the dimension is missing and the task partial
        {
            "index": 3,
            "scientific_eval": five,
            "visual_eval": {"parsed_result": {"scores": [1, 1]}},
            "instruction_eval": five,
        },
        # parse failure upstream (parsed_result null) is re-parsed from the raw response
        {
            "index": 4,
            "scientific_eval": five,
            "visual_eval": {"raw_response": '```json\n{"scores": [1,0,1,0,0]}\n```', "parsed_result": None},
            "instruction_eval": five,
        },
        # task 2's instruction block is numbered d11..d55: upstream scored it 0, here it is scored and flagged
        {"index": 2, "scientific_eval": five, "visual_eval": five, "instruction_eval": five},
        {"index": 999, "scientific_eval": five},
    ]
    path = tmp_path / "Other_result.json"
    path.write_text(json.dumps(items))
    entries, anomalies = import_upstream(path, bench)
    kinds = {(a.kind, a.index) for a in anomalies}
    assert {("wrong_length", 3), ("reparsed", 4), ("judged_without_criteria", 2), ("unknown_task", 999)} <= kinds
    assert [t.index for t, _ in entries] == [1, 3, 4, 2]
    judgements = {t.index: j for t, j in entries}
    assert judgements[4]["visual"] == [1, 0, 1, 0, 0] and "visual" not in judgements[3]
    result = rescore_upstream(path, bench)
    by_index = {s.index: s for s in result.scores}
    assert by_index[3].score is None and by_index[3].missing == ("visual",)
    assert by_index[2].dimensions["instruction"] > 0
    with pytest.raises(ValueError, match="JSON array"):
        (tmp_path / "bad_result.json").write_text("{}")
        import_upstream(tmp_path / "bad_result.json", bench)


def test_cli_rejects_bad_input(fake_judge, videos_dir, tmp_path, bench_dir, monkeypatch):
    monkeypatch.delenv("MICROVERSE_JUDGE_BASE_URL", raising=False)
    runner = CliRunner()
    no_judge = runner.invoke(
        eval_group, ["run", "--videos", str(videos_dir), "--model-name", "m", "--benchmark", str(bench_dir)]
    )
    assert no_judge.exit_code == 2 and "MICROVERSE_JUDGE_BASE_URL" in no_judge.output
    both = runner.invoke(
        eval_group, _run_args(fake_judge, videos_dir, tmp_path / "o", bench_dir, "--endpoint", "http://x")
    )
    assert both.exit_code == 2 and "exactly one of --endpoint and --videos" in both.output
    unknown = runner.invoke(eval_group, _run_args(fake_judge, videos_dir, tmp_path / "o", bench_dir, "--index", "999"))
    assert unknown.exit_code == 2 and "unknown task" in unknown.output
    fake_judge.state.models = {"fake-judge"}
    wrong = runner.invoke(
        eval_group, [*_run_args(fake_judge, videos_dir, tmp_path / "o", bench_dir), "--judge-model", "gpt-9"]
    )
    assert wrong.exit_code == 1 and "refused model 'gpt-9'" in wrong.output
    assert fake_judge.state.total_answered == 0


def test_missing_videos_and_failed_dimensions_lower_coverage(fake_judge, videos_dir, tmp_path, bench_dir):
    (videos_dir / "319.mp4").unlink()
    (videos_dir / "277.mp4").write_bytes(b"not a video")
    out = tmp_path / "run"
    result = CliRunner().invoke(eval_group, _run_args(fake_judge, videos_dir, out, bench_dir))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    cov = report["coverage"]
    assert (cov["selected"], cov["valid"]) == (6, 4)
    assert cov["missing_videos"] == [319] and cov["partial"] == {"277": ["scientific", "visual", "instruction"]}
    md = (out / "report.md").read_text()
    assert "Partial tasks (a dimension without a valid judgement; excluded from every average): 1: 277 (" in md
    assert "Tasks without a video (excluded from every average): 1: 319" in md
    assert report["overall"]["n"] == 4


def test_agreement_command(fake_judge, videos_dir, tmp_path, bench_dir):
    args = [
        "agreement",
        "--videos",
        str(videos_dir),
        "--model-name",
        "tiny",
        "--out",
        str(tmp_path / "agr"),
        "--benchmark",
        str(bench_dir),
        "--judge-base-url",
        fake_judge.base_url,
        "--tasks",
        "4",
        "--repeats",
        "3",
    ]
    result = CliRunner().invoke(eval_group, args)
    assert result.exit_code == 0, result.output
    assert fake_judge.state.total_answered == 4 * 3 * 3
    report = json.loads((tmp_path / "agr" / "report.json").read_text())
    for dim in ("scientific", "visual", "instruction"):
        a = report["agreement"][dim]
        assert a["repeats"] == 3 and a["n_items"] in (19, 20)  # task 277's instruction block has 4 criteria
        assert 0 < a["percent_agreement"] <= 100
    assert "## Judge agreement" in (tmp_path / "agr" / "report.md").read_text()


def _cache_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_killed_run_resumes_without_duplicate_judge_calls(fake_judge, videos_dir, tmp_path, bench_dir, subprocess_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "evaluation", *_run_args(fake_judge, videos_dir, out, bench_dir, "--concurrency", "3")]
    fake_judge.state.max_answers = 7  # answer 7 calls, then hold the ones in flight
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while _cache_rows(out / "cache.sqlite") < 7:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "run did not reach 7 judgements"
            time.sleep(0.05)
        time.sleep(0.3)  # let the held requests arrive
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists()
    assert fake_judge.state.total_answered == 7
    fake_judge.state.release.set()  # held requests of the dead run get 503, never an answer
    fake_judge.state.max_answers = None

    rerun = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    assert fake_judge.state.total_answered == 18  # 6 tasks x 3 dimensions
    assert fake_judge.state.duplicates == 0
    assert json.loads((out / "report.json").read_text())["coverage"]["valid"] == 6
