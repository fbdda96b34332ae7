"""train/report.py: stage records merge atomically; report.md has the header, the Metric × Stage table, totals, cost."""

import json

import pytest

from train import report as R


def test_record_stage_merges_sources_and_a_source_replaces_itself(tmp_path):
    R.record_stage(tmp_path, "sft", wall_s=10.0, metrics={"val_bpb": 0.9}, config={"steps": 5}, notes=["a"])
    R.record_stage(tmp_path, "sft", wall_s=7.0, summary={"ARC-Easy": 0.1}, notes=["old eval"], source="eval")
    R.record_stage(tmp_path, "sft", wall_s=2.5, summary={"ARC-Easy": 0.3}, timings={"ARC-Easy": 1.5},
                   notes=["a", "b"], source="eval")  # a re-run evaluation replaces the first one
    rec = R.load_stage(tmp_path, "sft")
    assert rec["wall_s"] == 12.5  # the evaluation's time adds to the stage's
    assert rec["metrics"] == {"val_bpb": 0.9} and rec["summary"] == {"ARC-Easy": 0.3}
    assert rec["timings"] == {"ARC-Easy": 1.5} and rec["config"] == {"steps": 5}
    assert rec["notes"] == ["a", "b"]  # a repeated note is kept once; the replaced evaluation's are gone
    assert "cpus" in rec["hardware"]
    assert not list((tmp_path / "report").glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("kwargs, match", [
    ({"summary": {"Accuracy": 0.5}}, "summary metrics must be among"),
    ({"metrics": {"x": "high"}}, r"metrics\['x'\] must be a number"),
    ({"wall_s": -1.0}, "wall_s must be"),
])
def test_record_stage_rejects_bad_input(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        R.record_stage(tmp_path, "base", **kwargs)
    with pytest.raises(ValueError, match="bad stage name"):
        R.record_stage(tmp_path, "../x")


def test_corrupt_record_is_a_clear_error(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "mid.json").write_text("{not json")
    with pytest.raises(ValueError, match="mid.json is not valid JSON"):
        R.load_stages(tmp_path)
    (tmp_path / "report" / "mid.json").write_text('{"stage": "mid", "metrics": {}}')
    with pytest.raises(ValueError, match="not a stage record of this version"):
        R.load_stages(tmp_path)


def test_render_report_summary_table_and_sections(tmp_path):
    R.record_run(tmp_path, tier="cpu")
    R.record_stage(tmp_path, "tokenizer", wall_s=5, metrics={"vocab_size": 8192})
    R.record_stage(tmp_path, "base", wall_s=120, metrics={"val_bpb": 2.1234567}, summary={"CORE": 0.05})
    R.record_stage(tmp_path, "sft", wall_s=60, summary={"ARC-Easy": 0.26, "GSM8K": 0.0, "ChatCORE": 0.01},
                   timings={"ARC-Easy": 3.25}, notes=["GSM8K-format synthetic arithmetic is not GSM8K"])
    md = R.render_report(tmp_path)
    assert md.startswith("# flashchat run report: cpu")
    lines = md.splitlines()
    assert "| Metric | BASE | SFT |" in lines  # only stages that exist, in pipeline order; no tokenizer column
    assert "| CORE | 0.0500 | – |" in lines
    assert "| ARC-Easy | – | 0.2600 |" in lines
    assert "| ChatCORE | – | 0.0100 |" in lines
    assert not any(line.startswith("| MMLU |") for line in lines)  # never a row of dashes only
    assert "- Total wall clock (sum of the stages' own records): 3m05s" in lines
    assert any(line.startswith("- Cost estimate: n/a on a CPU machine") for line in lines)
    for title in ("## Tokenizer", "## Base model", "## SFT"):
        assert title in lines
    assert "| val_bpb | 2.1235 |" in lines and "| vocab_size | 8192 |" in lines
    assert "| ARC-Easy | 3.2 |" in lines or "| ARC-Easy | 3.3 |" in lines
    assert "- Note: GSM8K-format synthetic arithmetic is not GSM8K" in lines
    assert md.index("## Summary") < md.index("## Tokenizer") < md.index("## Base model") < md.index("## SFT")


def test_total_uses_the_speedruns_stage_times(tmp_path):
    R.record_stage(tmp_path, "base", wall_s=100)
    R.record_run(tmp_path, stage_seconds={"tokenizer": 20.0, "base": 130.0})
    assert "- Total wall clock: 2m30s (tokenizer 0m20s, base 2m10s)" in R.render_report(tmp_path).splitlines()


def test_cost_estimate(tmp_path):
    R.record_stage(tmp_path, "base", wall_s=1800)
    assert "- Cost estimate: $12.00 at $24.00/h" in R.render_report(tmp_path, hourly_usd=24.0)
    assert R.hourly_price({"gpus": 8, "gpu_name": "NVIDIA H100 80GB HBM3"}, None) == 24.0
    assert R.hourly_price({"gpus": 2, "gpu_name": "Some GPU"}, None) == 2 * R.DEFAULT_GPU_HOURLY_USD
    assert R.hourly_price({"cpus": 2}, None) is None


def test_fmt_value():
    assert R.fmt_value(None) == "–"
    assert R.fmt_value(12345) == "12,345" and R.fmt_value(123) == "123"
    assert R.fmt_value(0.123456) == "0.1235" and R.fmt_value(123456.7) == "123,457"
    assert R.fmt_seconds(3725) == "1h02m05s" and R.fmt_seconds(65) == "1m05s"


def test_cli_writes_report_md(tmp_path):
    R.record_stage(tmp_path, "mid", wall_s=3, metrics={"val_bpb": 1.0})
    out = R.main(["--run-root", str(tmp_path)])
    assert out == tmp_path / "report.md" and "## Mid-training" in out.read_text()
    run = json.loads(R.record_run(tmp_path, tier="x").read_text())
    assert run["tier"] == "x" and "started" in run
    with pytest.raises(SystemExit, match="no report/ directory"):
        R.main(["--run-root", str(tmp_path / "nothing")])
