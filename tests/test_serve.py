"""The Serve app over real HTTP: a local Ray, a tiny model, 2 replicas, a snapshot store on disk."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

import openai  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from conftest import UNRELATED, fact_records, tiny_config  # noqa: E402
from melo_ray.editors.melo.editor import MeloEditor  # noqa: E402
from melo_ray.serving.app import ServeSettings, run_http  # noqa: E402
from melo_ray.store import SnapshotStore  # noqa: E402

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    store = SnapshotStore(tmp_path_factory.mktemp("serve") / "store")
    editor = MeloEditor(tiny_config())
    editor.edit(fact_records(0, 10))
    editor.publish(store)
    with pytest.MonkeyPatch.context() as env:
        # On a CPU shared with other jobs Serve's own proxy can miss its 5 s readiness check and be killed,
        # which fails every test here without saying anything about our app; Ray's processes inherit these.
        for check in ("READY_CHECK", "HEALTH_CHECK"):
            env.setenv(f"RAY_SERVE_PROXY_{check}_TIMEOUT_S", "60")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024)
        try:
            port = free_port()
            settings = ServeSettings(snapshots=str(store.root), replicas=2, replica_cpus=0.5, poll_interval_s=0.2,
                                     api_token=TOKEN, max_prompts=4, max_new_tokens=32, max_body_bytes=4096)
            run_http(settings, port=port, blocking=False)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=60)
            yield {"client": client, "editor": editor, "store": store, "port": port}
            client.close()
            serve.shutdown()
        finally:  # a failed start must not leave Ray up for the next module
            ray.shutdown()


def generate(client: httpx.Client, prompts: list[str], **extra) -> httpx.Response:
    return client.post("/v1/generate", json={"prompts": prompts, "max_new_tokens": 8, **extra})


def test_edited_prompts_get_their_targets_and_unrelated_ones_the_base_output(app):
    records = fact_records(0, 10)
    response = generate(app["client"], [records[2]["prompt"], UNRELATED[0], records[5]["prompt"], UNRELATED[1]])
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert outputs[0]["output"].startswith(records[2]["target"]) and outputs[0]["block"] == 0
    assert outputs[2]["output"].startswith(records[5]["target"]) and outputs[2]["block"] == 0
    base = app["editor"].generate(UNRELATED[:2], 8, base=True)
    assert [outputs[1]["output"], outputs[3]["output"]] == [g.output for g in base]
    assert outputs[1]["block"] is None and outputs[1]["distance"] > 0
    assert [o["edit_id"] for o in outputs] == ["f2", None, "f5", None]  # the edit behind each answer, as explain names it
    # the decision behind each answer: this config has no scope test, so the cluster radius decides
    assert [o["scope"]["rule"] for o in outputs] == ["inside_radius", "out_of_reach", "inside_radius", "out_of_reach"]
    assert outputs[0]["scope"]["edit_id"] == "f2" and outputs[1]["scope"]["edit_id"] is None
    assert [app["editor"].explain(p)["edit_id"] for p in (records[2]["prompt"], records[5]["prompt"])] == ["f2", "f5"]
    assert {o["snapshot_version"] for o in outputs} == {1}


def test_openai_client_gets_a_correct_completion(app):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app['port']}/v1", api_key=TOKEN)
    record = fact_records(0, 10)[4]
    completion = client.completions.create(model="melo-ray", prompt=record["prompt"], max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip().startswith(record["target"])
    assert completion.choices[0].model_extra["melo"]["edit_id"] == "f4"
    assert completion.choices[0].model_extra["melo"]["scope"]["rule"] == "inside_radius"
    assert completion.usage.completion_tokens >= 1
    many = client.completions.create(model="melo-ray", prompt=[record["prompt"], UNRELATED[2]], max_tokens=3,
                                     temperature=0, stop=["\n"])
    assert len(many.choices) == 2 and many.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("case,status", [
    ("malformed json", 400), ("not an object", 400), ("missing prompts", 422), ("wrong type", 422),
    ("empty prompt", 400), ("empty list", 400), ("too many prompts", 413), ("too many tokens", 400),
    ("oversize body", 413), ("no token", 401), ("wrong token", 401), ("unknown model", 404),
    ("temperature out of range", 400), ("stream of several prompts", 400),
])
def test_bad_requests_get_a_4xx_with_a_json_error(app, case, status):
    client: httpx.Client = app["client"]
    post = {
        "malformed json": lambda: client.post("/v1/generate", content=b'{"prompts": [', headers={"content-type": "application/json"}),
        "not an object": lambda: client.post("/v1/generate", json=["a"]),
        "missing prompts": lambda: client.post("/v1/generate", json={"max_new_tokens": 3}),
        "wrong type": lambda: client.post("/v1/generate", json={"prompts": [1, 2]}),
        "empty prompt": lambda: generate(client, ["ok", "   "]),
        "empty list": lambda: generate(client, []),
        "too many prompts": lambda: generate(client, ["a"] * 5),
        "too many tokens": lambda: client.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 33}),
        "oversize body": lambda: generate(client, ["x" * 5000]),
        "no token": lambda: httpx.post(f"http://127.0.0.1:{app['port']}/v1/generate", json={"prompts": ["a"]}),
        "wrong token": lambda: client.post("/v1/version", headers={"Authorization": "Bearer nope"}),
        "unknown model": lambda: client.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"}),
        "temperature out of range": lambda: client.post("/v1/completions", json={"prompt": "a", "temperature": 7}),
        "stream of several prompts": lambda: client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True}),
    }[case]
    if case == "wrong token":
        response = client.get("/v1/version", headers={"Authorization": "Bearer nope"})
    else:
        response = post()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]


def test_health_is_open_and_version_describes_the_snapshot(app):
    health = httpx.get(f"http://127.0.0.1:{app['port']}/healthz")
    assert health.status_code == 200
    info = app["client"].get("/v1/version").json()
    assert info["edits"] >= 10 and info["clusters"] >= 10 and info["backbone"]["family"] == "llama"
    # each replica says whether it is behind the store and when it last reached it
    fresh = info["freshness"]
    assert fresh["serving_version"] == info["snapshot_version"] and fresh["store_reachable"]
    assert fresh["latest_seen"] == app["store"].latest_version() and fresh["seconds_since_good_poll"] < 30
    assert health.json()["freshness"]["store_reachable"] and health.json()["status"] in ("ok", "stale")


def test_publishing_under_steady_traffic_switches_every_replica_with_zero_failures(app):
    client, editor, store = app["client"], app["editor"], app["store"]
    new = fact_records(10, 10)
    seen: list[tuple[str, int, str]] = []  # (replica, version, output of the new prompt)
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=client.base_url, headers=AUTH, timeout=60) as own:
            while not stop.is_set():
                try:
                    response = generate(own, [new[0]["prompt"], fact_records(0, 1)[0]["prompt"]])
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                        continue
                    body = response.json()
                    out = body["outputs"][0]
                    seen.append((body["replica"], out["snapshot_version"], out["output"]))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    start_version = editor.version
    editor.edit(new)
    editor.publish(store)
    deadline = time.time() + 60
    while time.time() < deadline:
        replicas_new = {r for r, v, _ in seen if v == editor.version}
        if len(replicas_new) == 2 and len(seen) > 20:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    versions_by_replica: dict[str, list[int]] = {}
    for replica, version, output in seen:
        versions_by_replica.setdefault(replica, []).append(version)
        if version == editor.version:
            assert output.startswith(new[0]["target"])  # the new edit is served with the new version
    assert len(versions_by_replica) == 2
    assert any(v == start_version for _, v, _ in seen)  # traffic really ran across the swap
    for versions in versions_by_replica.values():
        assert versions[-1] == editor.version
        assert versions == sorted(versions)  # never back to an older version


# -- hostile input: fuzzed requests against the running app --------------------------------------
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)  # surrogates and NULs included
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_TEXT, inner, max_size=5), max_leaves=12,
)
FIELDS = ["prompts", "prompt", "max_new_tokens", "max_tokens", "model", "temperature", "top_p", "n", "stop",
          "stream", "logprobs", "echo", "user", "messages", "seed", "max_completion_tokens"]
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | ANY_TEXT,
                                           "content": ANY_TEXT | JSON_VALUES}), max_size=4)
SHAPED = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5)  # near-valid bodies
BODIES = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),  # ensure_ascii: lone surrogates become \udXXX escapes
    SHAPED.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"messages": MESSAGES}, optional={"max_tokens": st.integers(-5, 40), "stream": st.booleans(),
                                                            "temperature": st.floats(-1, 3), "seed": st.integers()}
                          ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 2000).map(lambda depth: b'{"prompts": ' + b"[" * depth + b"]" * depth + b"}"),
)
# what an HTTP client can send at all (h11 refuses leading or trailing blanks in a header value)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip)
ROUTES = st.sampled_from([("POST", "/v1/generate"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                          ("GET", "/v1/version"),
                          ("GET", "/v1/models"), ("POST", "/v1/version"), ("GET", "/v1/generate")])
FUZZ_COUNT: dict[str, int] = {"requests": 0}


@given(route=ROUTES, body=BODIES, content_type=HEADER_TEXT, extra=st.dictionaries(
    st.sampled_from(["x-custom", "accept", "user-agent", "x-forwarded-for", "content-encoding"]), HEADER_TEXT,
    max_size=2))
def test_fuzzed_requests_never_get_a_5xx(app, route, body, content_type, extra):
    method, path = route
    response = app["client"].request(method, path, content=body, headers={"content-type": content_type, **extra})
    FUZZ_COUNT["requests"] += 1
    assert response.status_code < 500, (route, body[:200], response.status_code, response.text[:300])
    if response.status_code >= 400 and response.status_code != 405:  # 405: Starlette's own, for a wrong method
        error = response.json()["error"]
        assert error["message"] and error["code"] == response.status_code


def test_the_two_reported_500s_are_4xx_naming_the_problem(app):
    client = app["client"]
    response = client.post("/v1/generate", content=b'{"prompts": ["\\udcff"], "max_new_tokens": 3}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompts.0"
    deep = b'{"prompts": ' + b"[" * 1500 + b"]" * 1500 + b"}"  # within the app's 4 KB body limit
    response = client.post("/v1/generate", content=deep)
    assert response.status_code == 400 and "nested" in response.json()["error"]["message"]


def test_the_replica_keeps_serving_after_the_fuzzing(app):
    record = fact_records(0, 10)[3]
    response = generate(app["client"], [record["prompt"]])
    assert response.status_code == 200 and response.json()["outputs"][0]["output"].startswith(record["target"])
    if FUZZ_COUNT["requests"]:
        print(f"\nfuzzed requests sent: {FUZZ_COUNT['requests']}")


def test_replicas_follow_a_pin_and_an_unpin(app):
    """`melo-ray store pin` points every replica at an older version; unpin sends them back."""
    from melo_ray import operations

    client, store = app["client"], app["store"]
    latest = store.latest_version()
    assert latest is not None and latest >= 2  # the steady-traffic test published a second version

    def versions_seen(n: int = 12) -> set[int]:
        return {generate(client, ["zzzz"]).json()["outputs"][0]["snapshot_version"] for _ in range(n)}

    def wait_for(version: int) -> bool:
        deadline = time.time() + 60
        while time.time() < deadline:  # replicas poll every 0.2 s
            if versions_seen() == {version}:
                return True
        return False

    operations.pin(store.uri, 1)
    try:
        assert wait_for(1)
    finally:
        operations.unpin(store.uri)
    assert wait_for(latest)


# -- chat, streaming, sampling, explanations --------------------------------------------------------
def _openai(app) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"http://127.0.0.1:{app['port']}/v1", api_key=TOKEN, max_retries=0)


def test_chat_completions_keep_the_edit_and_say_which_edit_fired(app):
    record = fact_records(0, 10)[1]
    chat = _openai(app).chat.completions.create(
        model="melo-ray", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": record["prompt"]}])
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    melo = choice.model_extra["melo"]  # the extension field; the client keeps it aside
    assert melo["block"] == 0 and melo["edit_id"] == "f1" and melo["snapshot_version"] >= 1 and melo["distance"] is not None
    unrelated = _openai(app).chat.completions.create(model="melo-ray", max_tokens=4,
                                                     messages=[{"role": "user", "content": UNRELATED[1]}])
    assert unrelated.choices[0].model_extra["melo"]["block"] is None
    assert unrelated.choices[0].model_extra["melo"]["edit_id"] is None


def test_streaming_chat_and_completions_with_the_openai_client(app):
    client = _openai(app)
    record = fact_records(0, 10)[5]
    chunks = list(client.completions.create(model="melo-ray", prompt=record["prompt"], max_tokens=8, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model="melo-ray", prompt=record["prompt"], max_tokens=8)
    assert text == whole.choices[0].text and text.strip().startswith(record["target"])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) >= 2
    stream = client.chat.completions.create(model="melo-ray", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": record["prompt"]}])
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    assert parts[-1].choices[0].model_extra["melo"]["block"] == 0
    assert parts[-1].choices[0].model_extra["melo"]["edit_id"] == "f5"


def test_sampling_is_validated_and_seeded(app):
    client = _openai(app)
    prompt = fact_records(0, 10)[7]["prompt"]
    one = client.completions.create(model="melo-ray", prompt=prompt, max_tokens=10, temperature=1.3, top_p=0.9, seed=3)
    two = client.completions.create(model="melo-ray", prompt=prompt, max_tokens=10, temperature=1.3, top_p=0.9, seed=3)
    assert one.choices[0].text == two.choices[0].text and one.choices[0].model_extra["melo"]["block"] == 0
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="melo-ray", prompt=prompt, max_tokens=4, top_p=0)


def _decode_stats(app) -> list[dict]:
    return [app["client"].get("/v1/version").json()["decode"] for _ in range(8)]  # both replicas, by chance


def test_a_client_that_disconnects_mid_stream_frees_its_row(app):
    before = sum(s["cancelled"] for s in {json.dumps(s): s for s in _decode_stats(app)}.values())
    with httpx.stream("POST", f"http://127.0.0.1:{app['port']}/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "zzzz qqqq", "max_tokens": 32, "stream": True}) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    deadline = time.time() + 30
    while time.time() < deadline:  # the row leaves at the replica's next decode step
        stats = _decode_stats(app)
        if sum(s["cancelled"] for s in {json.dumps(s): s for s in stats}.values()) > before and all(
                s["running"] == 0 for s in stats):
            break
    else:
        pytest.fail(f"the disconnected row was not freed: {stats}")


def test_a_stream_finishes_on_the_version_it_started_on(app):
    client, editor, store = app["client"], app["editor"], app["store"]
    started = client.get("/v1/version").json()["snapshot_version"]
    versions_at_end: list[int] = []

    def stream_one() -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{app['port']}/v1/completions", headers=AUTH, timeout=60,
                          json={"prompt": "zzzz", "max_tokens": 32, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        versions_at_end.append(events[-1]["choices"][0]["melo"]["snapshot_version"])

    threads = [threading.Thread(target=stream_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    editor.edit(fact_records(30, 2))
    editor.publish(store)
    for thread in threads:
        thread.join()
    new = store.latest_version()
    assert all(v in (started, new) for v in versions_at_end) and len(versions_at_end) == 4
    deadline = time.time() + 30
    while time.time() < deadline and {o["snapshot_version"] for o in generate(client, ["a"]).json()["outputs"]} != {new}:
        pass


# -- faults under load (the short version of benchmarks/soak.py) ------------------------------------
def _replicas(app, want: int = 2, timeout: float = 120) -> dict[str, dict]:
    """Each replica's /v1/version, asked until `want` distinct replicas have answered."""
    seen: dict[str, dict] = {}
    deadline = time.time() + timeout
    while len(seen) < want:
        assert time.time() < deadline, f"only {len(seen)} of {want} replicas answered"
        try:
            info = app["client"].get("/v1/version", timeout=10).json()
            seen[info["replica"]] = info
        except (httpx.HTTPError, KeyError, ValueError):
            pass
    return seen


def test_faults_under_load_a_corrupted_version_is_never_served_and_a_killed_replica_costs_its_rows(app):
    import os
    import signal

    client, editor, store = app["client"], app["editor"], app["store"]
    answers: list[tuple[float, bool, int | None]] = []  # (ended, ok, version)
    stop, lock = threading.Event(), threading.Lock()
    in_flight = [0]
    prompts = [r["prompt"] for r in fact_records(0, 10)] + UNRELATED

    def user(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{app['port']}", headers=AUTH, timeout=120) as http:
            while not stop.is_set():
                with lock:
                    in_flight[0] += 1
                try:
                    response = http.post("/v1/generate", json={"prompts": [prompts[i % len(prompts)]], "max_new_tokens": 4})
                    ok = response.status_code == 200
                    version = response.json()["outputs"][0]["snapshot_version"] if ok else None
                except httpx.HTTPError:
                    ok, version = False, None
                with lock:
                    in_flight[0] -= 1
                    answers.append((time.time(), ok, version))
                i += 1

    users = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(16)]
    for thread in users:
        thread.start()
    try:
        # a version whose file is corrupted after writing: every replica refuses it and says so
        good = store.latest_version()
        store.pin(good)
        editor.edit(fact_records(40, 3))
        editor.publish(store)
        bad = store.latest_version()
        files = store.read_manifest(bad)["files"]
        path = f"{store.version_path(bad)}/{max(files, key=lambda n: files[n]['bytes'])}"
        data = bytearray(store.fs.open_input_stream(path).read())
        data[len(data) // 2] ^= 0xFF
        with store.fs.open_output_stream(path) as stream:
            stream.write(bytes(data))
        store.unpin()
        deadline = time.time() + 60
        while not all(bad in r["freshness"]["refused_versions"] and r["freshness"]["behind"]
                      for r in _replicas(app).values()):
            assert time.time() < deadline, "replicas did not refuse the corrupted version"

        # one replica's process killed under load: Serve replaces it; only rows in flight may fail
        victim = next(iter(_replicas(app).values()))
        with lock:
            at_kill = in_flight[0]
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.time() + 180
        while victim["replica"] in _replicas(app, timeout=180):
            assert time.time() < deadline, "the killed replica was not replaced"
        replaced_at = time.time()

        editor.edit(fact_records(43, 2))  # the next good version reaches every replica, old and new
        editor.publish(store)
        latest = store.latest_version()
        deadline = time.time() + 60
        while {r["snapshot_version"] for r in _replicas(app).values()} != {latest}:
            assert time.time() < deadline, "replicas did not move past the bad version"
    finally:
        stop.set()
        for thread in users:
            thread.join(120)
    assert answers and not any(version == bad for _, ok, version in answers if ok)  # never served
    before_kill = [ok for ended, ok, _ in answers if ended < killed_at]
    assert len(before_kill) > 16 and all(before_kill)  # none failed while the bad version was out
    failed = sum(not ok for _, ok, _ in answers)
    assert failed <= at_kill, f"{failed} requests failed; {at_kill} were in flight when the replica was killed"
