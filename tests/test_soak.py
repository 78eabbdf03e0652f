"""The service under load, end to end: a real `hsml serve` on 127.0.0.1, its prediction log, its process.

- overload is answered 503 with `Retry-After` while `/health` and `/ready` answer 200;
- SIGTERM with requests in flight: `/ready` turns 503 while the service drains, every request in flight is
  answered, every answered prediction is in the log exactly once, and the process exits 0;
- a soak: a minute here (ten with `HSML_SLOW=1`, marked `slow`) of traffic at a fixed concurrency: four client
  threads, each sending its next request (1 to 8 records) as soon as the last is answered. First one sequential
  client measures the service alone (what `benchmarks/serve.py` measures as single-record latency); the soak's
  requests and rows per second beside it are printed (a closed loop: how far above the sequential figure depends
  on the cores free). Checked: no 5xx, no prediction-log line lost or doubled, resident memory growth under 10% after
  warm-up. p99 latency is printed, never asserted.

Every loop is bounded in count and time; requests in flight are held open deterministically with a raw socket
that sends a request's headers and all but the last byte of its body.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from hsml.bundle import demo_frame

SLOW = os.environ.get("HSML_SLOW") == "1"
HSML = Path(sys.executable).with_name("hsml")  # the console script of this environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HsmlServe:
    "`hsml serve` in a subprocess on a free loopback port, started and waited for until /ready is 200."

    def __init__(self, bundle: Path, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"predictions-{self.port}.jsonl"
        self.out_path = tmp / f"server-{self.port}.out"
        self.out = open(self.out_path, "w")
        cmd = [str(HSML), "serve", "--model", str(bundle), "--port", str(self.port), "--log", str(self.log)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HSML_API_TOKEN": ""}
        self.proc = subprocess.Popen([*cmd, *args], env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hsml serve exited: {self.out_path.read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("hsml serve did not become ready in 90 s")

    def terminate(self, timeout: float = 60) -> int:
        "SIGTERM, then the exit status (killed and failed after `timeout` seconds)."
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"hsml serve did not stop in {timeout} s after SIGTERM") from None
        finally:
            self.out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.out.close()


@pytest.fixture(scope="module")
def bundle(demo_lgbm_dir) -> Path:
    "The demo LightGBM bundle (nine features, fast path): conftest's, shared with test_serve_fast."
    return demo_lgbm_dir


@pytest.fixture(scope="module")
def records() -> list[dict]:
    "Feature records with company ids 0..999."
    recs = demo_frame(1000, seed=11).drop("label").to_dicts()
    return [r | {"id": i} for i, r in enumerate(recs)]


def body_of(records: list[dict], start: int, n: int) -> tuple[bytes, list[int]]:
    "(JSON body, company ids) of n records from `start` (cycling)."
    recs = [records[(start + i) % len(records)] for i in range(n)]
    return json.dumps({"records": recs}).encode(), [r["id"] for r in recs]


def hold(port: int, body: bytes, rid: str) -> socket.socket:
    "A /predict request held in flight: its headers and all but the last byte of its body are sent."
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: {rid}\r\n\r\n"
    )
    s.sendall(head.encode() + body[:-1])
    return s


def finish(s: socket.socket, body: bytes) -> tuple[int, dict]:
    "Send the held request's last byte; (status, JSON answer)."
    s.sendall(body[-1:])
    r = http.client.HTTPResponse(s)
    r.begin()
    out = r.status, json.loads(r.read())
    s.close()
    return out


def log_pairs(path: Path) -> Counter:
    "(request_id, company id) -> how many lines of the prediction log carry it."
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return Counter((x["request_id"], x["id"]) for x in lines)


def check_log(path: Path, answered: Counter) -> dict:
    "Every answered (request id, company) is in the log exactly once, and nothing else is."
    logged = log_pairs(path)
    lost = sum((answered - logged).values())
    doubled = sum(n - 1 for n in logged.values() if n > 1)
    extra = sum((logged - answered).values())
    return {
        "log_lines": sum(logged.values()),
        "lines_lost": lost,
        "lines_doubled": doubled,
        "lines_extra": extra,
    }


# ---------------------------------------------------------------------------------------------------------
# overload


def test_overload_is_503_with_retry_after_while_health_answers(bundle, records, tmp_path):
    s = HsmlServe(bundle, tmp_path, "--max-in-flight", "2")
    try:
        bodies = [body_of(records, 10 * k, 5) for k in range(3)]
        held = [hold(s.port, b, f"held-{k}") for k, (b, _) in enumerate(bodies[:2])]
        with httpx.Client(base_url=s.url, timeout=10) as c:
            # the server counts a request once it has read its headers: wait for that (bounded, logs nothing)
            for _ in range(100):
                if c.get("/model").status_code == 503:
                    break
                time.sleep(0.05)
            r = c.post("/predict", content=bodies[2][0], headers={"content-type": "application/json"})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"] == "application/json"
            msg = r.json()["message"]
            assert "overloaded" in msg and "limit is 2" in msg and "--max-in-flight" in msg
            # probes are exempt: answered while every slot is taken
            assert c.get("/health").json()["status"] == "ok"
            ready = c.get("/ready")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            assert c.get("/model").status_code == 503  # every other route counts
            # the held requests are answered; then the slots are free again
            answers = [finish(h, b) for h, (b, _) in zip(held, bodies[:2])]
            assert [a[0] for a in answers] == [200, 200]
            assert [[p["id"] for p in a[1]["predictions"]] for a in answers] == [ids for _, ids in bodies[:2]]
            r = c.post("/predict", content=bodies[2][0], headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
        assert s.terminate() == 0
        answered = Counter((f"held-{k}", i) for k in range(2) for i in bodies[k][1])
        answered.update((r.json()["request_id"], i) for i in bodies[2][1])
        want = {"log_lines": 15, "lines_lost": 0, "lines_doubled": 0, "lines_extra": 0}
        assert check_log(s.log, answered) == want  # the 503 logged nothing
    finally:
        s.kill()


def test_max_in_flight_must_be_positive(bundle, tmp_path):
    p = subprocess.run(
        [str(HSML), "serve", "--model", str(bundle), "--port", str(free_port()), "--max-in-flight", "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "max_in_flight must be >= 1" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_drains_answers_in_flight_and_flushes_the_log(bundle, records, tmp_path):
    drain = 1.5
    s = HsmlServe(bundle, tmp_path, "--drain-seconds", str(drain))
    answered: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def client(t: int) -> None:
        "Batches of 50 on one keep-alive connection until the server goes away (at most 60 s, 20,000 requests)."
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=s.url, timeout=30) as c:
            for k in range(20_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                body, ids = body_of(records, 50 * k + t, 50)
                rid = f"c{t}-{k}"
                try:
                    r = c.post(
                        "/predict",
                        content=body,
                        headers={"content-type": "application/json", "x-request-id": rid},
                    )
                except httpx.HTTPError:
                    return  # the server closed: stop
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                with lock:
                    answered.update((rid, i) for i in ids)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(3)]
    try:
        for th in threads:
            th.start()
        held_body, held_ids = body_of(records, 500, 20)
        held = hold(s.port, held_body, "held-sigterm")
        time.sleep(0.5)
        t_sig = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        # draining: /ready is 503 and says why, while predictions are still answered
        ready = None
        while time.monotonic() < t_sig + drain - 0.3:
            ready = httpx.get(s.url + "/ready", timeout=5)
            if ready.status_code == 503:
                break
            time.sleep(0.05)
        assert ready is not None and ready.status_code == 503, ready and ready.text
        assert ready.json()["ready"] is False and ready.json()["problem"].startswith("draining")
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200
        body, ids = body_of(records, 900, 3)
        r = httpx.post(
            s.url + "/predict",
            content=body,
            headers={"content-type": "application/json", "x-request-id": "during-drain"},
            timeout=5,
        )
        assert r.status_code == 200, r.text
        answered.update(("during-drain", i) for i in ids)
        # past the drain window the port is closed; the held request is still in flight: answer it
        time.sleep(max(0.0, t_sig + drain + 0.5 - time.monotonic()))
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
        status, ans = finish(held, held_body)
        assert status == 200 and [p["id"] for p in ans["predictions"]] == held_ids
        answered.update(("held-sigterm", i) for i in held_ids)
        rc = s.proc.wait(60)
        assert rc == 0, s.out_path.read_text()
    finally:
        stop.set()
        for th in threads:
            th.join(60)
        s.kill()
    assert not errors, errors[:3]
    figures = check_log(s.log, answered)
    print("sigterm:", json.dumps(figures | {"requests_answered": len({r for r, _ in answered})}))
    assert figures["lines_lost"] == figures["lines_doubled"] == figures["lines_extra"] == 0, figures


# ---------------------------------------------------------------------------------------------------------
# soak


def soak(bundle: Path, records: list[dict], tmp: Path, seconds: float, clients: int = 4) -> dict:
    "Run `hsml serve` under closed-loop load for `seconds`; the figures, after checks on every answer."
    s = HsmlServe(bundle, tmp)
    try:
        # what one sequential client gets (the benchmark's single-record case), for scale
        one = [body_of(records, i, 1) for i in range(200)]
        h = {"content-type": "application/json"}
        answered: Counter = Counter()
        n_seq, t0 = 0, time.monotonic()
        with httpx.Client(base_url=s.url, headers=h, timeout=30) as c:
            while n_seq < 5000 and time.monotonic() - t0 < 3:
                body, ids = one[n_seq % 200]
                assert (
                    c.post("/predict", content=body, headers={"x-request-id": f"seq-{n_seq}"}).status_code
                    == 200
                )
                answered[(f"seq-{n_seq}", ids[0])] += 1
                n_seq += 1
        seq_rate = n_seq / (time.monotonic() - t0)

        statuses: Counter = Counter()
        lat: list[list[float]] = [[] for _ in range(clients)]
        lock = threading.Lock()
        end = time.monotonic() + seconds
        cap = int(seconds * 5000)  # per client: a bound far above what a client can send

        def client(t: int) -> None:
            mine: Counter = Counter()
            with httpx.Client(base_url=s.url, headers=h, timeout=30) as c:
                for k in range(cap):
                    if time.monotonic() > end:
                        break
                    body, ids = body_of(records, 7 * k + 131 * t, 1 + (k % 8))
                    rid = f"s{t}-{k}"
                    t1 = time.perf_counter()
                    try:
                        r = c.post("/predict", content=body, headers={"x-request-id": rid})
                    except httpx.HTTPError as e:
                        with lock:
                            statuses[type(e).__name__] += 1
                        continue
                    lat[t].append(time.perf_counter() - t1)
                    with lock:
                        statuses[r.status_code] += 1
                    if r.status_code == 200:
                        mine.update((rid, i) for i in ids)
            with lock:
                answered.update(mine)

        rss: list[tuple[float, int]] = []
        health: list[float] = []

        def watch() -> None:
            "Resident memory every second, /health latency every half second, until the soak ends."
            with httpx.Client(base_url=s.url, timeout=30) as c:
                for i in range(int(seconds * 2) + 10):
                    if time.monotonic() > end:
                        return
                    if i % 2 == 0:
                        rss.append((time.monotonic(), s.ps.memory_info().rss))
                    t1 = time.perf_counter()
                    ok = c.get("/health").status_code == 200
                    health.append(time.perf_counter() - t1 if ok else float("inf"))
                    time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
        threads.append(threading.Thread(target=watch))
        start = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(seconds + 120)
        wall = time.monotonic() - start
        assert not any(th.is_alive() for th in threads), "a client did not stop"
        rc = s.terminate()
        assert rc == 0, s.out_path.read_text()
    finally:
        s.kill()
    all_lat = np.concatenate([np.asarray(x) for x in lat])
    warm = start + max(10.0, 0.2 * seconds)  # warm-up: the first fifth (at least 10 s)
    base = [m for t, m in rss if warm <= t < warm + 5]
    last = [m for _, m in rss[-5:]]
    n = sum(statuses.values())
    figures = {
        "seconds": round(wall, 1),
        "clients": clients,
        "requests": n,
        "statuses": {str(k): v for k, v in statuses.items()},
        "rows": sum(answered.values()) - n_seq,
        "requests_per_s": round(n / wall, 1),
        "sequential_requests_per_s": round(seq_rate, 1),
        "rows_per_s": round((sum(answered.values()) - n_seq) / wall, 1),
        "rows_vs_sequential": round((sum(answered.values()) - n_seq) / wall / seq_rate, 2),
        "requests_vs_sequential": round(n / wall / seq_rate, 2),
        "p50_ms": round(float(np.percentile(all_lat, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(all_lat, 99)) * 1e3, 2),
        "health_p99_ms": round(float(np.percentile(health, 99)) * 1e3, 2),
        "rss_after_warmup_mb": round(np.mean(base) / 2**20, 1),
        "rss_end_mb": round(np.mean(last) / 2**20, 1),
        "rss_growth": round(np.mean(last) / np.mean(base) - 1, 4),
        "exit_code": rc,
    }
    figures |= check_log(s.log, answered)
    print("soak:", json.dumps(figures), flush=True)
    return figures


def check_soak(f: dict) -> None:
    assert f["requests"] > 0 and set(f["statuses"]) == {"200"}, f["statuses"]  # no 5xx, nor anything else
    assert f["lines_lost"] == f["lines_doubled"] == f["lines_extra"] == 0, f
    assert f["rss_growth"] < 0.10, f


def test_soak_a_minute(bundle, records, tmp_path):
    check_soak(soak(bundle, records, tmp_path, float(os.environ.get("HSML_SOAK_SECONDS") or 60)))


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="ten minutes: set HSML_SLOW=1")
def test_soak_ten_minutes(bundle, records, tmp_path):
    check_soak(soak(bundle, records, tmp_path, 600))
