"""Faults under load (issue 37): two Serve replicas answer requests at concurrency 16 for several
minutes while the store and the replicas are hurt, one fault at a time:

  publish   a new version is published every few seconds;
  kill      one replica's process is killed (SIGKILL) and Serve replaces it;
  outage    the object store stops answering for 30 s (moto's server process is SIGSTOPped), then
            comes back (local store: skipped);
  corrupt   a version whose files were corrupted after writing is published (verified on install,
            so no replica may serve it; each says so in /v1/version).

Per phase: requests sent and failed, answers from an unexpected version (one never published, or the
corrupted one), latency, and what the replicas' freshness said. One JSON document (also to --out).

    OMP_NUM_THREADS=1 python benchmarks/soak.py --store s3 --phase-s 60 --out runs/soak-s3.json
    OMP_NUM_THREADS=1 python benchmarks/soak.py --store local --phase-s 60

The S3 server is moto's standalone server (PyPI `moto[server]`), configured for every process through
the standard AWS variables only, as a KubeRay pod gets it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import UNRELATED, fact_records  # noqa: E402  (the tests' tiny facts: same words, same cities)

BUCKET = "melo-ray-soak"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class MotoProcess:
    """moto's S3 server as a process of its own, so it can be stopped (SIGSTOP) like a store outage."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "soak",
                    "AWS_SECRET_ACCESS_KEY": "soak", "AWS_REGION": "us-east-1"}
        wait_until(self._answers, 30, "moto_server to answer")
        import boto3

        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="soak", aws_secret_access_key="soak").create_bucket(Bucket=BUCKET)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Answer:
    started: float
    seconds: float
    ok: bool
    version: int | None = None
    replica: str | None = None
    error: str | None = None


@dataclass
class Load:
    """`concurrency` clients, each sending one /v1/generate request after another."""

    port: int
    prompts: list[str]
    concurrency: int = 16
    answers: list[Answer] = field(default_factory=list)
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.concurrency)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120) as client:
            n = i
            while not self.stopping.is_set():
                prompt = self.prompts[n % len(self.prompts)]
                n += self.concurrency
                began = time.monotonic()
                with self.lock:
                    self.in_flight += 1
                try:
                    response = client.post("/v1/generate", json={"prompts": [prompt], "max_new_tokens": 6})
                    if response.status_code == 200:
                        body = response.json()
                        answer = Answer(began, time.monotonic() - began, True,
                                        body["outputs"][0]["snapshot_version"], body.get("replica"))
                    else:
                        answer = Answer(began, time.monotonic() - began, False, error=f"HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    answer = Answer(began, time.monotonic() - began, False, error=type(exc).__name__)
                with self.lock:
                    self.in_flight -= 1
                    self.answers.append(answer)


def replicas(port: int, want: int, timeout: float = 120) -> dict[str, dict]:
    """Each replica's /v1/version (the proxy spreads requests, so ask until `want` distinct ones answer)."""
    seen: dict[str, dict] = {}

    def enough() -> bool:
        try:
            info = httpx.get(f"http://127.0.0.1:{port}/v1/version", timeout=10).json()
            seen[info["replica"]] = info
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return len(seen) >= want

    wait_until(enough, timeout, f"{want} replicas to answer", every=0.05)
    return seen


def corrupt_file(store, version: int) -> str:
    """Flip a byte of the largest file of a published version, as a bad disk or a partial copy would."""
    files = store.read_manifest(version)["files"]
    name = max(files, key=lambda n: files[n]["bytes"])
    path = f"{store.version_path(version)}/{name}"
    with store.fs.open_input_stream(path) as stream:
        data = bytearray(stream.read())
    data[len(data) // 2] ^= 0xFF
    with store.fs.open_output_stream(path) as stream:
        stream.write(bytes(data))
    return name


def summarise(answers: list[Answer], start: float, end: float, good_versions: set[int]) -> dict:
    mine = [a for a in answers if start <= a.started < end]
    ok = [a for a in mine if a.ok]
    seconds = sorted(a.seconds for a in ok)
    return {
        "sent": len(mine), "failed": len(mine) - len(ok),
        "unexpected_version": sum(1 for a in ok if a.version not in good_versions),
        "errors": sorted({a.error for a in mine if a.error}),
        "p50_ms": round(1000 * statistics.median(seconds), 1) if seconds else None,
        "p99_ms": round(1000 * seconds[int(0.99 * (len(seconds) - 1))], 1) if seconds else None,
        "versions_answered": sorted({a.version for a in ok if a.version is not None}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["local", "s3"], default="s3")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-llama.yaml"))
    parser.add_argument("--phase-s", type=float, default=60.0, help="length of each fault's phase")
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--publish-every", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    moto = MotoProcess() if args.store == "s3" else None
    if moto is not None:
        os.environ.update(moto.env)  # before Ray starts: every replica inherits exactly these variables
    import ray
    from ray import serve

    from melo_ray.config import load_config
    from melo_ray.editors.melo.editor import MeloEditor
    from melo_ray.serving.app import ServeSettings, run_http
    from melo_ray.store import SnapshotStore

    scratch = tempfile.mkdtemp(prefix="melo-soak-")
    uri = f"s3://{BUCKET}/soak" if moto is not None else f"{scratch}/store"
    store = SnapshotStore(uri)
    editor = MeloEditor(load_config(args.config))
    batch = 0

    def publish() -> int:
        nonlocal batch
        editor.edit(fact_records(10 * batch, 10))
        batch += 1
        editor.publish(store)
        return editor.version

    good = {publish()}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024)
    port = free_port()
    run_http(ServeSettings(snapshots=uri, replicas=args.replicas, replica_cpus=2 / (args.replicas + 1),
                           poll_interval_s=args.poll_s, max_prompts=4, max_new_tokens=16), port=port, blocking=False)
    replicas(port, args.replicas)
    prompts = [r["prompt"] for r in fact_records(0, 10)] + UNRELATED
    load = Load(port, prompts, args.concurrency).start()
    phases: dict[str, dict] = {}
    marks: list[tuple[str, float, float]] = []

    def phase(name: str, body) -> None:
        began = time.monotonic()
        notes = body() or {}
        marks.append((name, began, time.monotonic()))
        phases[name] = notes

    def steady() -> dict:
        time.sleep(args.phase_s / 3)
        return {}

    def publishing() -> dict:
        versions = []
        deadline = time.monotonic() + args.phase_s
        while time.monotonic() < deadline:
            versions.append(publish())
            good.add(versions[-1])
            time.sleep(args.publish_every)
        wait_until(lambda: {i["snapshot_version"] for i in replicas(port, args.replicas).values()} == {versions[-1]},
                   60, "every replica to serve the last version")
        return {"published": versions}

    def kill() -> dict:
        victim = next(iter(replicas(port, args.replicas).values()))
        in_flight = load.in_flight
        os.kill(victim["pid"], signal.SIGKILL)
        began = time.monotonic()
        wait_until(lambda: victim["replica"] not in replicas(port, args.replicas, 180), 180, "a replacement replica")
        replaced = time.monotonic() - began
        time.sleep(max(0.0, args.phase_s / 2 - replaced))
        return {"killed_pid": victim["pid"], "in_flight_at_kill": in_flight, "replaced_after_s": round(replaced, 1)}

    def outage() -> dict:
        if moto is None:
            return {"skipped": "a local store has no server to stop"}
        moto.pause()
        time.sleep(args.outage_s)
        said = [i["freshness"] for i in replicas(port, args.replicas, 60).values()]
        moto.resume()
        wait_until(lambda: all(i["freshness"]["store_reachable"] for i in replicas(port, args.replicas).values()),
                   120, "replicas to reach the store again")
        version = publish()  # and the store takes writes again
        good.add(version)
        wait_until(lambda: {i["snapshot_version"] for i in replicas(port, args.replicas).values()} == {version},
                   120, "every replica to serve the version published after the outage")
        return {"freshness_during_outage": said, "published_after": version}

    def corrupt() -> dict:
        serving = editor.version
        store.pin(serving)  # hold replicas on a good version while the bad one is made
        bad = publish()
        good.discard(bad)
        broken = corrupt_file(store, bad)
        store.unpin()
        wait_until(lambda: all(bad in i["freshness"]["refused_versions"]
                               for i in replicas(port, args.replicas).values()), 120, "replicas to refuse it")
        said = [i["freshness"] for i in replicas(port, args.replicas).values()]
        time.sleep(args.phase_s / 3)
        version = publish()  # the next good version is installed as usual
        good.add(version)
        wait_until(lambda: {i["snapshot_version"] for i in replicas(port, args.replicas).values()} == {version},
                   120, "every replica to move past the bad version")
        return {"corrupted_version": bad, "corrupted_file": broken, "freshness_after": said, "next_good": version}

    try:
        for name, body in (("steady", steady), ("publish", publishing), ("kill", kill), ("outage", outage),
                           ("corrupt", corrupt)):
            phase(name, body)
    finally:
        load.stop()
        serve.shutdown()
        ray.shutdown()
        if moto is not None:
            moto.stop()
    report = {"measurement": "soak", "store": args.store, "concurrency": args.concurrency, "replicas": args.replicas,
              "config": args.config, "phases": {}}
    for name, began, ended in marks:
        report["phases"][name] = {**summarise(load.answers, began, ended, good), **phases[name],
                                  "seconds": round(ended - began, 1)}
    report["total"] = summarise(load.answers, marks[0][1], marks[-1][2], good)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
