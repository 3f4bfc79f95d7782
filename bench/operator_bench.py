"""Operator benchmark: many FineTuneJobs at once against the API-server emulator.

    python bench/operator_bench.py [--jobs 200] [--idle 1000] [--skip-idle]

Phase 1 creates ``--jobs`` FineTuneJobs at once, each download -> sft -> dpo -> merge -> serve (four Jobs
and a vLLM Deployment). A player thread plays the Job and Deployment controllers: every workload is marked
successful (Deployments available) the moment it appears. Reported:

* stage hand-off latency: from the moment the player's success PATCH of step N returned to the moment the
  emulator stored the workload of step N+1 (p50/p99 over every hand-off),
* total time from the first create to the last FineTuneJob ``Serving``,
* the operator's peak RSS (VmHWM of its process),
* API requests per FineTuneJob (everything the operator process sent: kopf's watches and the reconciler's
  calls), by verb.

Phase 2 creates ``--idle`` FineTuneJobs whose first workload is created and then never finishes, waits until
every one is Running and one full resync has passed, and reports the operator's RSS.

The operator runs as its own process (``ftctl operator``), exactly as deployed; the emulator runs in this
process (it shares the machine's cores with the operator, so figures are conservative). CPU is reported for
both, from the first create to the last ``Serving``: the operator's per hand-off, and its share of the total.
``FT_BENCH_OPERATOR_PYTHON`` runs the operator with another interpreter: one whose environment has only the
runtime dependencies (``pip install .``) measures the memory of the operator image, without the test tools'
Kubernetes client libraries that kopf imports whenever they are installed. ``FT_BENCH_PROFILE=FILE`` writes a
cProfile (in CPU time) of the operator per phase (``FILE.pipelines``, ``FILE.idle``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.emulator import EmulatorServer  # noqa: E402

FTJ = "finetunejobs.finetune.dev"
WORKLOADS = {("batch", "jobs"): "Job", ("apps", "deployments"): "Deployment"}
SUCCESS = {
    "Job": {"conditions": [{"type": "Complete", "status": "True", "reason": "CompletionsReached"}], "succeeded": 1},
    "Deployment": {
        "replicas": 1,
        "availableReplicas": 1,
        "readyReplicas": 1,
        "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
    },
}


def finetunejob(name: str, namespace: str, *, full: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "backend": "job",
        "model": {"volume": {"claimName": "models", "subPath": "tiny"}, "template": "qwen"},
        "datasets": [{"name": "chat", "volume": {"claimName": "data", "subPath": "chat.jsonl"}}],
        "output": {"volume": {"claimName": "outputs"}},
        "stages": [{"name": "sft", "type": "sft", "datasets": ["chat"], "method": "lora"}],
        "retries": 0,
    }
    if full:
        spec["model"]["source"] = "org/tiny"
        spec["datasets"].append(
            {
                "name": "prefs",
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                "volume": {"claimName": "data", "subPath": "prefs.jsonl"},
            }
        )
        spec["stages"].append({"name": "dpo", "type": "dpo", "datasets": ["prefs"], "method": "lora"})
        spec["merge"] = {"enabled": True}
        spec["serve"] = {"enabled": True, "resources": {"gpusPerNode": 1}}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in bytes; CPU seconds (user + system) as ``cpu``."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out: dict[str, float] = {"cpu": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Player:
    """Plays the workload controllers: marks every new workload successful as soon as the emulator stores it."""

    def __init__(self, server: EmulatorServer, *, play: bool) -> None:
        self.server = server
        self.play = play
        self.created: dict[tuple[str, str], float] = {}  # (namespace, name) -> when stored
        self.succeeded: dict[tuple[str, str], float] = {}  # (namespace, name) -> when our PATCH returned
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="player", daemon=True)
        self._thread.start()

    def _new_workloads(self, last_rv: int) -> tuple[int, list[tuple[str, str, str]]]:
        """Workloads ADDED since ``last_rv``, from the emulator's event history (caller holds its lock)."""
        found = []
        history = self.server.emulator._history
        newest = last_rv
        for rv, key, etype, obj, _old in reversed(history):
            if rv <= last_rv:
                break
            newest = max(newest, rv)
            kind = WORKLOADS.get(key)
            if kind is not None and etype == "ADDED":
                found.append((kind, obj["metadata"]["namespace"], obj["metadata"]["name"]))
        return newest, found[::-1]

    def _run(self) -> None:
        emulator = self.server.emulator
        last_rv = 0
        while not self._stopped:
            with emulator.changed:
                last_rv, found = self._new_workloads(last_rv)
                if not found:
                    emulator.changed.wait(0.5)
                    continue
            now = time.monotonic()
            for _kind, ns, name in found:
                self.created.setdefault((ns, name), now)
            if not self.play:
                continue
            for kind, ns, name in found:
                resource = "jobs.batch" if kind == "Job" else "deployments.apps"
                self.server.patch_status(resource, name, SUCCESS[kind], ns)
                self.succeeded[(ns, name)] = time.monotonic()

    def stop(self) -> None:
        self._stopped = True
        self._thread.join(10)


def start_operator(
    kubeconfig: pathlib.Path, env_extra: dict[str, str], log: pathlib.Path, phase: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), **env_extra)
    code = "from finetune_operator.cli import run; run()"
    python = os.environ.get("FT_BENCH_OPERATOR_PYTHON") or sys.executable
    profile = os.environ.get("FT_BENCH_PROFILE")  # write a cProfile of the operator process: FILE.<phase>
    if profile:
        profile = f"{profile}.{phase}"
        code = (
            # CPU time, not wall time: on a shared machine wall time counts other processes' turns too.
            "import atexit, cProfile, time; from finetune_operator.cli import run; "
            "p = cProfile.Profile(time.process_time); "
            f"atexit.register(lambda: (p.disable(), p.dump_stats({profile!r}))); p.enable(); run()"
        )
    cmd = [python, "-c", code, "operator", "--all-namespaces"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until(predicate: Any, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll)


def states(server: EmulatorServer, namespace: str) -> Counter[str]:
    return Counter(((o.get("status") or {}).get("state") or "-") for o in server.list(FTJ, namespace))


def setup(tmp: pathlib.Path) -> tuple[EmulatorServer, pathlib.Path]:
    server = EmulatorServer().start()
    server.apply_crd(ROOT / "crds")
    return server, server.kubeconfig(tmp / "kubeconfig")


def warm_up(server: EmulatorServer, ns: str) -> None:
    """Create one job and wait for its first workload: the operator's watches are established."""
    server.create(finetunejob("warmup", ns, full=False))
    wait_until(lambda: server.get("jobs.batch", "warmup-sft", ns) is not None, 60, "operator did not start")
    server.delete(FTJ, "warmup", ns)


def pipelines(n: int, tmp: pathlib.Path) -> dict[str, Any]:
    server, kubeconfig = setup(tmp)
    ns = "bench"
    server.ensure_namespace(ns)
    player = Player(server, play=True)
    proc = start_operator(kubeconfig, {"FT_RESYNC_SECONDS": "60"}, tmp / "operator-pipelines.log", "pipelines")
    try:
        warm_up(server, ns)
        first_request = len(server.emulator.request_log)
        cpu0, bench_cpu0 = proc_status(proc.pid)["cpu"], time.process_time()
        t0 = time.monotonic()
        for i in range(n):
            server.create(finetunejob(f"ftj-{i:04d}", ns, full=True))
        wait_until(lambda: states(server, ns).get("Serving", 0) >= n, 900, "not every pipeline reached Serving", 0.5)
        total = time.monotonic() - t0
        mem = proc_status(proc.pid)
        cpu, bench_cpu = mem["cpu"] - cpu0, time.process_time() - bench_cpu0
        # Events are posted after the transitions they describe: let the operator go quiet before counting.
        seen = -1
        while seen != len(server.emulator.request_log):
            seen = len(server.emulator.request_log)
            time.sleep(1.5)
        log = list(server.emulator.request_log)[first_request:]
    finally:
        proc.terminate()
        proc.wait(30)
        player.stop()
        server.stop()

    handoffs = []
    chain = ["download", "sft", "dpo", "merge", "serve"]
    for i in range(n):
        for prev, nxt in itertools.pairwise(chain):
            done = player.succeeded.get((ns, f"ftj-{i:04d}-{prev}"))
            created = player.created.get((ns, f"ftj-{i:04d}-{nxt}"))
            if done is not None and created is not None:
                handoffs.append(max(0.0, created - done))
    handoffs.sort()
    verbs = Counter(r.verb for r in log)
    detail = Counter(f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}" for r in log)
    return {
        "jobs": n,
        "handoffs": len(handoffs),
        "handoff_p50_s": round(statistics.median(handoffs), 4),
        "handoff_p99_s": round(handoffs[min(len(handoffs) - 1, int(len(handoffs) * 0.99))], 4),
        "handoff_max_s": round(handoffs[-1], 4),
        "total_s": round(total, 2),
        "operator_peak_rss_mb": round(mem["VmHWM"] / 2**20, 1),
        "operator_cpu_s": round(cpu, 2),
        "operator_cpu_per_handoff_ms": round(1000 * cpu / max(1, len(handoffs)), 2),
        "emulator_and_player_cpu_s": round(bench_cpu, 2),
        "operator_cpu_share": round(cpu / max(1e-9, cpu + bench_cpu), 2),
        "load_average": os.getloadavg()[0],
        "api_requests_per_job": round(len(log) / n, 1),
        "api_requests_per_job_by_verb": {v: round(c / n, 2) for v, c in sorted(verbs.items())},
        "api_requests_per_job_by_resource": {v: round(c / n, 2) for v, c in sorted(detail.items())},
    }


def idle(n: int, tmp: pathlib.Path, resync: float) -> dict[str, Any]:
    server, kubeconfig = setup(tmp)
    ns = "idle"
    server.ensure_namespace(ns)
    player = Player(server, play=False)
    proc = start_operator(kubeconfig, {"FT_RESYNC_SECONDS": str(resync)}, tmp / "operator-idle.log", "idle")
    try:
        warm_up(server, ns)
        t0 = time.monotonic()
        for i in range(n):
            server.create(finetunejob(f"idle-{i:04d}", ns, full=False))
        wait_until(lambda: states(server, ns).get("Running", 0) >= n, 1200, "not every job reached Running", 1.0)
        settle = time.monotonic() - t0
        time.sleep(resync * 1.6)  # one full resync of every job (a benchmark, not a test: a sleep is the point)
        mem = proc_status(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        player.stop()
        server.stop()
    return {
        "idle_jobs": n,
        "time_to_all_running_s": round(settle, 1),
        "operator_rss_mb": round(mem["VmRSS"] / 2**20, 1),
        "operator_peak_rss_mb": round(mem["VmHWM"] / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs created at once (phase 1)")
    parser.add_argument("--idle", type=int, default=1000, help="idle FineTuneJobs (phase 2)")
    parser.add_argument("--skip-idle", action="store_true", help="run phase 1 only")
    parser.add_argument("--resync", type=float, default=20.0, help="operator resync period in phase 2 (s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        results["pipelines"] = pipelines(args.jobs, tmp)
        if not args.skip_idle:
            results["idle"] = idle(args.idle, tmp, args.resync)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    p = results["pipelines"]
    print(f"{p['jobs']} FineTuneJobs at once (download -> sft -> dpo -> merge -> serve), {p['handoffs']} hand-offs")
    print(
        f"  stage hand-off latency  p50 {p['handoff_p50_s'] * 1000:.0f} ms   p99 {p['handoff_p99_s'] * 1000:.0f} ms"
        f"   max {p['handoff_max_s'] * 1000:.0f} ms   (target p99 <= 1000 ms)"
    )
    print(f"  total time              {p['total_s']:.1f} s")
    print(f"  operator peak RSS       {p['operator_peak_rss_mb']:.1f} MB")
    print(
        f"  CPU seconds             operator {p['operator_cpu_s']}"
        f" ({p['operator_cpu_per_handoff_ms']} ms per hand-off),"
        f" emulator+player {p['emulator_and_player_cpu_s']} (operator share {p['operator_cpu_share']:.0%})"
    )
    print(f"  load average (1 min)    {p['load_average']:.1f} at the end")
    print(f"  API requests per job    {p['api_requests_per_job']}  {p['api_requests_per_job_by_verb']}")
    if "idle" in results:
        i = results["idle"]
        print(f"{i['idle_jobs']} idle FineTuneJobs (all Running after {i['time_to_all_running_s']:.0f} s)")
        print(
            f"  operator RSS            {i['operator_rss_mb']:.1f} MB (peak {i['operator_peak_rss_mb']:.1f} MB;"
            " target <= 150 MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
