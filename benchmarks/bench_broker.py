"""The ceiling of one cluster: a real broker driven by many simulated drivers and worker slots.

    python benchmarks/bench_broker.py [--drivers 8] [--slots 64] [--seconds 5] [--window 2000]

Starts a real ``distfork broker`` process (on a private ``ipc://`` socket,
``--insecure``: the ceiling of the task table, without CURVE) and, in this
process, ``--drivers`` driver sockets and ``--slots`` one-slot worker sockets
that speak the real wire protocol (``distfork.protocol``): drivers keep
``--window`` no-op tasks in flight each, workers answer every task at once.
Prints the tasks/s the broker routed and its CPU time per task (from
/proc, through psutil), and, for scale, the no-op throughput of a
``concurrent.futures.ProcessPoolExecutor`` with 2 workers measured in the
same run. The simulator shares the machine with the broker, so on 2 cores the
broker's CPU per task is the figure to read; tasks/s is a lower bound.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import zmq

from bench_tasks import noop
from distfork import protocol
from distfork.protocol import Msg, ResultEntry, Status, TaskEntry

_PAYLOAD = pickle.dumps((noop, (), {}), protocol=5)  # what a no-op SUBMIT carries, opaque to the broker
_RESULT = pickle.dumps(None, protocol=5)

def _socket(ctx: zmq.Context[Any], address: str, ident: bytes) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, ident)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(address)
    return s


def _hello(s: zmq.Socket[Any], info: dict[str, Any]) -> None:
    s.send_multipart(protocol.encode_json(Msg.HELLO, info))
    kind, _ = protocol.decode(s.recv_multipart(copy=False))
    if kind is not Msg.WELCOME:
        raise SystemExit(f"the broker answered HELLO with {kind.name}")


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def drive(address: str, broker: psutil.Process, drivers: int, slots: int, seconds: float,
          window: int, batch: int) -> tuple[int, float, float]:
    """Run the simulation; returns (tasks completed, wall seconds, broker CPU seconds), warm-up excluded."""
    ctx: zmq.Context[Any] = zmq.Context()
    pid = os.getpid()
    host = "bench-host"
    ws = [_socket(ctx, address, b"w%05d" % i) for i in range(slots)]
    ds = [_socket(ctx, address, b"d%05d" % i) for i in range(drivers)]
    for i, s in enumerate(ws):  # one-slot workers on another "host": no shared memory domain
        _hello(s, {"role": "worker", "name": f"sim/{i}", "host": host, "pid": pid, "slots": 1,
                   "shm_domain": None, "heartbeat_s": 1.0})
    for s in ds:
        _hello(s, {"role": "driver", "host": host, "pid": pid, "shm_domain": None, "heartbeat_s": 1.0})
    poller = zmq.Poller()
    for s in (*ws, *ds):
        poller.register(s, zmq.POLLIN)
    is_worker = {s: True for s in ws} | {s: False for s in ds}
    in_flight = dict.fromkeys(ds, 0)
    next_id = dict.fromkeys(ds, 1)

    def top_up(d: zmq.Socket[Any]) -> None:
        while in_flight[d] <= window - batch:
            first = next_id[d]
            next_id[d] += batch
            in_flight[d] += batch
            d.send_multipart(protocol.encode_batch(
                Msg.SUBMIT,
                [TaskEntry(i, protocol.DEFAULT_RETRIES, 0.0, [_PAYLOAD]) for i in range(first, first + batch)]))

    done = 0
    cpu0 = 0.0
    counting = False
    t0 = time.perf_counter()
    warm_until = t0 + min(1.0, seconds / 4)
    end = warm_until + seconds
    for d in ds:
        top_up(d)
    while True:
        now = time.perf_counter()
        if not counting and now >= warm_until:
            counting, done, t0, cpu0 = True, 0, now, _cpu_s(broker)
        if now >= end:
            break
        for s, _ in poller.poll(100):
            for _ in range(64):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                kind, body = protocol.decode(frames)
                if is_worker[s]:
                    if kind is Msg.TASKS:
                        tasks = protocol.decode_tasks(frames, body)
                        s.send_multipart(protocol.encode_batch(
                            Msg.RESULTS, [ResultEntry(t.id, Status.OK, 1e-6, [_RESULT]) for t in tasks]))
                elif kind is Msg.RESULTS:
                    n = len(protocol.decode_results(frames, body))
                    in_flight[s] -= n
                    done += n
                    top_up(s)
    wall = time.perf_counter() - t0
    cpu = _cpu_s(broker) - cpu0
    for s in (*ws, *ds):
        s.send_multipart(protocol.encode_signal(Msg.BYE))
        s.close(linger=0)
    ctx.term()
    return done, wall, cpu


def pool_throughput(n: int) -> float:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        for f in [pool.submit(noop) for _ in range(200)]:
            f.result()
        t0 = time.perf_counter()
        for f in [pool.submit(noop) for _ in range(n)]:
            f.result()
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drivers", type=int, default=8)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=2000, help="tasks in flight per driver")
    ap.add_argument("--batches", default="200,1", help="tasks per SUBMIT message, one run each")
    ap.add_argument("--profile", metavar="PREFIX", help="run the broker under cProfile: PREFIX-<batch>.prof")
    a = ap.parse_args()
    print(f"one broker, {a.drivers} simulated drivers ({a.window} in flight each), {a.slots} simulated worker slots")
    pool = pool_throughput(20000)
    print(f"ProcessPoolExecutor, 2 workers, no-op:  {pool:9.0f} tasks/s")
    for batch in (int(b) for b in a.batches.split(",")):
        tput, cpu_us = run_broker(a, batch)
        print(f"SUBMIT of {batch:4d} tasks: broker routed {tput:9.0f} tasks/s ({tput / pool:5.2f}x the pool)   "
              f"broker CPU {cpu_us:6.1f} us/task   (one broker core's ceiling: {1e6 / cpu_us:9.0f} tasks/s)")


def run_broker(a: argparse.Namespace, batch: int) -> tuple[float, float]:
    """One broker process driven with SUBMITs of ``batch`` tasks: (tasks/s, broker CPU us per task)."""
    with tempfile.TemporaryDirectory(prefix="distfork-bench-") as tmp:
        os.chmod(tmp, 0o700)
        address = f"ipc://{tmp}/broker.sock"
        profile = ["-m", "cProfile", "-o", f"{a.profile}-{batch}.prof"] if a.profile else []
        broker = subprocess.Popen([sys.executable, *profile, "-m", "distfork", "broker", "--bind", address,
                                   "--insecure"], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(address[len("ipc://"):]):
                if broker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the broker did not start")
                time.sleep(0.01)
            tasks, wall, cpu = drive(address, psutil.Process(broker.pid), a.drivers, a.slots, a.seconds, a.window,
                                     batch)
        finally:
            broker.terminate()
            broker.wait(30)
    return tasks / wall, cpu / max(tasks, 1) * 1e6


if __name__ == "__main__":
    main()
