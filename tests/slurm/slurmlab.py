"""A real Slurm cluster on one machine: munged, slurmctld and N slurmd "nodes" in network namespaces.

::

    namespace df-<tag>-b  "login node"                 namespace df-<tag>-w1  node "node-a"
    ┌─────────────────────────────────┐               ┌───────────────────────────────────┐
    │ slurmctld  (SlurmctldHost addr) │── bridge ────│ slurmd -N node-a, 10.253.N.2       │
    │ sbatch / squeue / scancel       │               │ own hostname, own /dev/shm         │
    │ distfork broker + the driver    │               │ jobs: distfork worker ...          │
    └─────────────────────────────────┘               └───────────────────────────────────┘
                    ▲                                  node-b, node-c ...: the same
                    └─ munged (this namespace), its socket in the lab's directory: shared by all

Everything the lab writes lives in one temporary directory (0700): the
munge key and socket, slurm.conf (``SLURM_CONF``), the controller's state,
each node's spool, pid and log files. :meth:`SlurmLab.stop` cancels every
job, stops the daemons by pid, deletes the namespaces and the directory.

``unavailable()`` says why it cannot run here (skip with it). Run by hand as
root for a demo: ``python tests/slurm/slurmlab.py`` (starts it, runs
``srun hostname`` on every node, stops).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the deploy helpers

from deploy.netns import Lan  # noqa: E402
from deploy.netns import unavailable as netns_unavailable  # noqa: E402

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "squeue", "scancel", "sinfo", "srun")
NODE_CPUS = 4  # declared per node (config_overrides: more than this machine has is fine)


def unavailable() -> str | None:
    """Why a SlurmLab cannot start here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): "
                "apt-get install -y slurm-wlm munge (.ci/run does)")
    return netns_unavailable(bridge=True, own_shm=True, hostnames=True)


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


SLURM_CONF = """\
ClusterName=distforklab
SlurmctldHost={ctl_host}({ctl_addr})
SlurmctldPort={ctl_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={dir}/ctld-state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU,CR_LLN
SchedulerType=sched/builtin
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
MessageTimeout=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=2
OverTimeLimit=0
Waittime=0
TCPTimeout=2
MaxArraySize=1001
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmLab:
    """munged + slurmctld on a login namespace, ``nodes`` slurmd in namespaces of their own."""

    def __init__(self, nodes: int = 2, own_shm: bool = True) -> None:
        self.lan = Lan(workers=nodes, own_shm=own_shm, hostnames=True)
        for i, h in enumerate(self.lan.worker_hosts):
            h.hostname = f"node-{chr(ord('a') + i)}"
        self.dir = Path(tempfile.mkdtemp(prefix="df-slurmlab-"))
        os.chmod(self.dir, 0o700)
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge.socket"
        self.munged: subprocess.Popen[Any] | None = None
        self.slurmctld: subprocess.Popen[Any] | None = None
        self.slurmds: list[subprocess.Popen[Any]] = []

    # -- what tests use --------------------------------------------------------

    @property
    def login(self) -> Any:
        """The login node's host (its namespace runs slurmctld, the broker and drivers)."""
        return self.lan.broker

    @property
    def nodes(self) -> list[Any]:
        return self.lan.worker_hosts

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment whose Slurm commands talk to this lab's controller."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *cmd: str, timeout_s: float = 60.0, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on the login node to its end."""
        done = self.lan.run(self.login, *cmd, timeout_s=timeout_s, env=env or self.env())
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def start_on_login(self, *cmd: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` on the login node; :meth:`stop` ends it if it still runs."""
        return self.lan.start(self.login, *cmd, env=env or self.env(), **popen)

    def squeue(self) -> list[tuple[str, str, str]]:
        """Every job in the queue, one row per array task: (job id, state, node list)."""
        out = self.run("squeue", "--array", "--noheader", "--format=%i|%T|%N").stdout
        return [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def shm_segments(self) -> dict[str, list[str]]:
        """The distfork segments in each node's own /dev/shm (entered through its slurmd's mount namespace)."""
        out = {}
        for h, p in zip(self.nodes, self.slurmds, strict=True):
            done = subprocess.run(["nsenter", "-t", str(p.pid), "-m", "ls", "/dev/shm"], capture_output=True,
                                  text=True, timeout=10)
            if done.returncode != 0:
                raise RuntimeError(f"cannot list {h.hostname}'s /dev/shm: {done.stderr.strip()}")
            out[h.hostname] = [n for n in done.stdout.split() if n.startswith("df-")]
        return out

    def log(self, name: str = "slurmctld") -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else f"(no {path})"

    def logs(self, tail: int = 1500) -> str:
        """The end of every daemon's log (for a failure message)."""
        names = ["slurmctld", *(f"slurmd-{h.hostname}" for h in self.nodes)]
        return "\n".join(f"--- {n}.log:\n{self.log(n)[-tail:]}" for n in names)

    # -- start and stop ---------------------------------------------------------

    def start(self, timeout_s: float = 40.0) -> SlurmLab:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        self.lan.up()
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munged = subprocess.Popen(
            [_exe("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--log-file={self.dir / 'munged.log'}", f"--pid-file={self.dir / 'munged.pid'}",
             f"--seed-file={self.dir / 'munged.seed'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _poll(lambda: self.munge_socket.exists(), 10, "munged to create its socket")
        (self.dir / "ctld-state").mkdir()
        (self.dir / "spool").mkdir()
        for h in self.nodes:
            (self.dir / "spool" / h.hostname).mkdir()
        nodes = "\n".join(f"NodeName={h.hostname} NodeAddr={h.ip} CPUs={NODE_CPUS} RealMemory=1000 State=UNKNOWN"
                          for h in self.nodes)
        self.conf.write_text(SLURM_CONF.format(
            ctl_host=socket.gethostname(), ctl_addr=self.login.ip, ctl_port=6817, slurmd_port=6818,
            munge_socket=self.munge_socket, dir=self.dir, nodes=nodes,
            node_names=",".join(h.hostname for h in self.nodes)))
        # slurmd loads a cgroup plugin even with proctrack/linuxproc; autodetection fails on a
        # hybrid hierarchy (a tmpfs at /sys/fs/cgroup), so name it (nothing is constrained by it)
        (self.dir / "cgroup.conf").write_text(f"CgroupPlugin={_cgroup_plugin()}\nCgroupMountpoint=/sys/fs/cgroup\n")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.slurmctld = self.lan.start(self.login, _exe("slurmctld"), "-D", "-i", "-f", str(self.conf),
                                        env=self.env(), **quiet)
        for h in self.nodes:
            self.slurmds.append(self.lan.start(h, _exe("slurmd"), "-D", "-N", h.hostname, "-f", str(self.conf),
                                               env=self.env(), **quiet))

        def all_idle() -> bool:
            for p in (self.slurmctld, *self.slurmds):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"{p.args} exited ({p.returncode}):\n{self.logs()}")
            done = self.run("sinfo", "--noheader", "--Node", "--format=%N|%t", check=False, timeout_s=10)
            states = dict(line.split("|") for line in done.stdout.split() if "|" in line)
            return done.returncode == 0 and all(states.get(h.hostname) == "idle" for h in self.nodes)

        _poll(all_idle, timeout_s, "every slurmd node to be idle", self.logs)

    def cancel_all(self, timeout_s: float = 20.0) -> None:
        """scancel every job and wait until the queue is empty."""
        if self.slurmctld is None or self.slurmctld.poll() is not None:
            return
        self.run("scancel", "--user", str(os.getuid()), check=False, timeout_s=10)
        _poll(lambda: not self.squeue(), timeout_s, "the queue to be empty after scancel")

    def stop(self) -> None:
        """Cancel every job, stop the daemons (by pid), delete the namespaces and the directory."""
        try:
            try:
                self.cancel_all()
            except (RuntimeError, AssertionError, subprocess.TimeoutExpired):
                pass
            for p in [*self.slurmds, self.slurmctld]:  # started by the lan: SIGTERM, then SIGKILL by it
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            self.lan.down()
            self.slurmds.clear()
            self.slurmctld = None
            if self.munged is not None:
                if self.munged.poll() is None:
                    self.munged.terminate()
                try:
                    self.munged.wait(10)
                except subprocess.TimeoutExpired:
                    self.munged.kill()
                    self.munged.wait()
                self.munged = None
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlurmLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cgroup_plugin() -> str:
    """cgroup/v2 on a unified hierarchy, else cgroup/v1."""
    return "cgroup/v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "cgroup/v1"


def _poll(predicate: Any, timeout_s: float, what: str, detail: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}"
                               + (f"\n{detail()}" if detail is not None else ""))
        time.sleep(0.1)


def main() -> int:
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    with SlurmLab() as lab:
        print(f"up in {time.monotonic() - started:.1f} s; conf {lab.conf}")
        out = lab.run("srun", f"--nodes={len(lab.nodes)}", "--ntasks-per-node=1", "hostname", timeout_s=60)
        print(out.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
