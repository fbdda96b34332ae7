"""train/speedrun.py: the plan of every tier, and the skip / resume / --from / changed-command logic of the stages.

The orchestration tests run real subprocesses: each stage's command is a small `python -c` program that appends
its name to a log, so the order and the skips are observed from outside, as a user would see them.
"""

import json
import sys

import pytest

from train import speedrun as S


class Scripted(S.Speedrun):
    """The real orchestrator with stage commands that log their name (and fail on request)."""

    def __init__(self, root, fail=(), flags=None):
        super().__init__(S.TIERS["cpu"], root, gpus=0, log=lambda m: None)
        self.fail, self.flags = set(fail), flags or {}

    def command(self, stage):
        code = (f"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + ' ' + ' '.join(sys.argv[3:]) + '\\n'); "
                f"sys.exit({1 if stage in self.fail else 0})")
        return [sys.executable, "-c", code, str(self.root / "log.txt"), stage, *self.flags.get(stage, [])]

    def ran(self):
        path = self.root / "log.txt"
        return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def test_runs_every_stage_in_order_then_skips_them(tmp_path):
    run = Scripted(tmp_path)
    run.run()
    stages = run.stages()
    assert run.ran() == stages
    assert stages[0] == "tokenizer" and stages[-1] == "report" and "download" not in stages  # cpu: offline
    assert (tmp_path / "report.md").exists()  # rendered at the end whatever the stages recorded
    run.run()
    assert run.ran() == stages  # the second run skips every finished stage


def test_a_failed_stage_stops_the_run_and_resumes_there(tmp_path):
    run = Scripted(tmp_path, fail={"mid"})
    with pytest.raises(SystemExit, match="stage mid failed"):
        run.run()
    assert run.ran()[-1] == "mid" and "mid_eval" not in run.ran()
    assert run.marker("base") is not None and run.marker("mid") is None  # no marker for a failed stage
    n = len(run.ran())
    run.fail = set()
    run.run()
    assert run.ran()[n:] == run.stages()[run.stages().index("mid"):]  # nothing before mid runs again


def test_training_stages_resume_from_their_checkpoints(tmp_path):
    run = Scripted(tmp_path, fail={"base"})
    (tmp_path / "base" / "checkpoints" / "step_000050").mkdir(parents=True)
    (tmp_path / "base" / "checkpoints" / "step_000050" / "COMPLETE").write_text("")
    with pytest.raises(SystemExit):
        run.run()
    assert (tmp_path / "log.txt").read_text().splitlines()[-1] == "base --resume"


def test_from_forgets_that_stage_and_every_later_one(tmp_path):
    run = Scripted(tmp_path)
    run.run()
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "old").write_text("x")
    (tmp_path / "report").mkdir(exist_ok=True)
    (tmp_path / "report" / "sft.json").write_text("{}")
    n = len(run.ran())
    run.run(from_stage="sft")
    stages = run.stages()
    assert run.ran()[n:] == stages[stages.index("sft"):]
    assert not (tmp_path / "sft" / "old").exists() and not (tmp_path / "report" / "sft.json").exists()
    with pytest.raises(SystemExit, match="--from download: not a stage of tier cpu"):
        run.run(from_stage="download")


def test_a_changed_command_reruns_that_stage_and_all_later(tmp_path):
    Scripted(tmp_path).run()
    run = Scripted(tmp_path, flags={"mid": ["--num-iterations", "99"]})
    n = len(run.ran())
    run.run()
    stages = run.stages()
    assert run.ran()[n:] == stages[stages.index("mid"):]
    assert json.loads((tmp_path / "stages" / "mid.json").read_text())["command"][-1] == "99"


def test_torn_marker_counts_as_not_done(tmp_path):
    run = Scripted(tmp_path)
    run.run()
    (tmp_path / "stages" / "rl.json").write_text('{"key": ')
    n = len(run.ran())
    run.run()
    assert run.ran()[n:] == ["rl"]


@pytest.mark.parametrize("tier, gpus", [("cpu", 0), ("d20", 8), ("d26", 8), ("d32", 1)])
def test_dry_run_plan(tmp_path, capsys, tier, gpus):
    S.main(["--tier", tier, "--gpus", str(gpus), "--dry-run", "--base-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"tier {tier}:" in out and "estimated" in out and "tokens" in out
    for stage in ("tokenizer", "base", "mid", "sft", "rl", "report"):
        assert f"  {stage} " in out
    assert ("  download " in out) == (tier != "cpu")
    assert ("torch.distributed.run" in out) == (gpus > 1)
    assert not (tmp_path / tier).exists()  # a dry run writes nothing


def test_d20_plan_matches_nanochat_scale(tmp_path):
    run = S.Speedrun(S.TIERS["d20"], tmp_path, gpus=8)
    text = "\n".join(run.plan())
    assert "d20: C=1280" in text and "524,288 tokens" in text and "(20.0 per scaling parameter)" in text


def test_any_depth_and_no_rl(tmp_path, capsys):
    S.main(["--depth", "12", "--gpus", "1", "--no-rl", "--dry-run", "--base-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "tier d12:" in out and "  rl " not in out and "--depth 12" in out
