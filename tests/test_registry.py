"""The model registry end to end: publish, promote, history, show from the command line, atomicity under
crashes and concurrency, tamper detection, and the W&B model artifact carrying the alias."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsml.bundle import demo_bundle, load_bundle
from hsml.core import HsmlError, sha256_file
from hsml.registry import history, list_models, load_model, promote, publish, registry_lock, resolve, show

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(reg: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    "Run the registry commands in a fresh process (the `hsml registry` group)."
    code = "from hsml.registry import registry_app; registry_app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--registry", str(reg)]
        if args[0] != "--help"
        else [sys.executable, "-c", code, *args],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    run = d / "run-a"
    demo_bundle(run / "model", "logreg", n=300, name="leads")
    (run / "manifest.json").write_text(json.dumps({"run_id": "run-a"}))
    (run / "config.yaml").write_text("model: logreg\n")
    b2 = demo_bundle(d / "b2", "lgbm", n=300, seed=1, name="leads")
    return {"run": run, "b2": b2}


def test_publish_promote_history_show_cli(bundles, tmp_path):
    reg = tmp_path / "registry"
    p = cli(reg, "publish", str(bundles["run"]), "--name", "leads", "--tracking", "disabled")
    assert p.returncode == 0, p.stderr
    assert "published leads v1" in p.stdout
    p = cli(
        reg, "publish", str(bundles["b2"]), "--name", "leads", "--tracking", "disabled", "--alias", "staging"
    )
    assert "published leads v2 (staging)" in p.stdout, p.stdout + p.stderr
    # the published copy is byte-identical, with the run's manifest and config beside it
    v1 = reg / "leads" / "versions" / "1"
    for f in (bundles["run"] / "model").iterdir():
        assert sha256_file(v1 / "model" / f.name) == sha256_file(f)
    assert (v1 / "run" / "manifest.json").exists() and (v1 / "run" / "config.yaml").exists()
    rec = json.loads((v1 / "version.json").read_text())
    assert rec["version"] == 1 and rec["run_id"] == "demo-logreg-0" and len(rec["digest"]) == 64
    before = {v: sha256_file(reg / "leads" / "versions" / str(v) / "version.json") for v in (1, 2)}

    assert (
        cli(reg, "promote", "leads", "1", "--alias", "production", "--tracking", "disabled").returncode == 0
    )
    p = cli(reg, "promote", "leads", "2", "--alias", "production", "--tracking", "disabled")
    assert "leads@production -> v2 (was v1)" in p.stdout
    p = cli(reg, "list")
    assert "leads" in p.stdout and "production=v2" in p.stdout and "staging=v2" in p.stdout
    p = cli(reg, "list", "--json")
    assert json.loads(p.stdout) == [
        {"name": "leads", "versions": [1, 2], "latest": 2, "aliases": {"production": 2, "staging": 2}}
    ]
    p = cli(reg, "history", "leads")
    lines = p.stdout.splitlines()
    prod = [x for x in lines if x.startswith("production")]
    assert len(prod) == 2 and " v1 " in prod[0] and "(current)" not in prod[0] and "(current)" in prod[1]
    assert "published v1" in p.stdout and "published v2" in p.stdout
    p = cli(reg, "show", "leads@production")
    assert "leads v2" in p.stdout and "verified   yes" in p.stdout and "roc_auc" in p.stdout
    s = json.loads(cli(reg, "show", "leads@1", "--json").stdout)
    assert s["version"] == 1 and s["aliases"] == [] and s["verified"] is True
    # versions never change: promoting only moves aliases
    assert {v: sha256_file(reg / "leads" / "versions" / str(v) / "version.json") for v in (1, 2)} == before
    assert [e["event"] for e in history("leads", reg)] == [
        "publish",
        "publish",
        "promote",
        "promote",
        "promote",
    ]
    # mistakes are exit 2 with a message
    p = cli(reg, "promote", "leads", "7", "--tracking", "disabled")
    assert p.returncode == 2 and "no version 7" in p.stderr
    p = cli(reg, "show", "nobody@production")
    assert p.returncode == 2 and "no model named 'nobody'" in p.stderr
    p = cli(reg, "promote", "leads", "1", "--alias", "Prod!", "--tracking", "disabled")
    assert p.returncode == 2 and "not a valid alias" in p.stderr
    p = cli(reg, "publish", str(tmp_path / "missing"), "--name", "leads", "--tracking", "disabled")
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_help_has_examples():
    p = cli(Path("."), "--help")
    assert p.returncode == 0
    for cmd in ("list", "show", "promote", "history", "publish"):
        assert cmd in p.stdout
    code = "from hsml.registry import registry_app; registry_app()"
    p = subprocess.run(
        [sys.executable, "-c", code, "promote", "--help"], env=ENV, capture_output=True, text=True
    )
    assert "hsml registry promote conversion-lgbm 3 --alias production" in p.stdout


def test_resolve_references(bundles, tmp_path):
    reg = tmp_path / "registry"
    publish(bundles["run"], "leads", root=reg, tracking="disabled")
    publish(bundles["b2"], "leads", root=reg, tracking="disabled")
    promote("leads", 1, "production", root=reg, tracking="disabled")
    assert resolve("leads", reg).version == 2
    assert resolve("leads@latest", reg).version == 2
    assert resolve("leads@v1", reg).version == 1
    assert resolve("leads@2", reg).version == 2
    m = resolve("leads@production", reg)
    assert (m.version, m.alias) == (1, "production")
    assert resolve(str(bundles["run"]), reg).path == bundles["run"] / "model"
    assert resolve(bundles["b2"], reg).name is None
    b = load_model("leads@production", reg)
    assert b.registry["version"] == 1 and b.registry["aliases"] == ["production"]
    os.environ["HSML_REGISTRY"] = str(reg)
    try:
        assert resolve("leads@v1").version == 1  # $HSML_REGISTRY
    finally:
        del os.environ["HSML_REGISTRY"]


def test_concurrent_publishes_get_distinct_versions(bundles, tmp_path):
    reg = tmp_path / "registry"
    code = "import sys; from hsml.registry import publish; print(publish(sys.argv[1], 'conc', root=sys.argv[2], tracking='disabled'))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(bundles["b2"]), str(reg)],
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(6)
    ]
    got = sorted(int(p.communicate(timeout=300)[0]) for p in procs)
    assert got == [1, 2, 3, 4, 5, 6]
    assert [e["version"] for e in history("conc", reg) if e["event"] == "publish"] == [1, 2, 3, 4, 5, 6]
    assert list_models(reg)[0]["versions"] == [1, 2, 3, 4, 5, 6]
    for v in range(1, 7):
        assert show(f"conc@{v}", reg)["verified"]


def _killed_publish(bundle: Path, reg: Path, where: str) -> None:
    "Start a publish that stops at `where` ('copy' or 'rename'), then kill -9 it there."
    flag = reg.parent / f"reached-{where}"
    code = f"""
import os, shutil, sys, time
from pathlib import Path
import hsml.registry as r
flag = Path({str(flag)!r})
if {where!r} == "copy":
    orig = shutil.copytree
    def slow(a, b, **k):
        orig(a, b, **k)
        (Path(b) / "model.joblib").write_bytes(b"half")  # a half-written file
        flag.write_text("x"); time.sleep(600)
    shutil.copytree = slow
else:
    orig = os.rename
    def slow(a, b):
        flag.write_text("x"); time.sleep(600)
    r.os.rename = slow
r.publish(sys.argv[1], "crash", root=sys.argv[2], tracking="disabled")
"""
    p = subprocess.Popen([sys.executable, "-c", code, str(bundle), str(reg)], env=ENV)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the publish did not reach the crash point"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_crashed_publish_leaves_no_version(bundles, tmp_path):
    reg = tmp_path / "registry"
    publish(bundles["b2"], "crash", root=reg, tracking="disabled")
    # killed while copying: only an ignored temporary directory is left
    _killed_publish(bundles["b2"], reg, "copy")
    assert list_models(reg)[0]["versions"] == [1]
    leftovers = [p.name for p in (reg / "crash" / "versions").iterdir() if not p.name.isdigit()]
    assert leftovers and all(x.startswith(".publish-") for x in leftovers)
    # killed while holding the lock, just before the rename: the stale lock is broken by the next publish
    _killed_publish(bundles["b2"], reg, "rename")
    assert (reg / "crash" / ".lock").exists()
    assert list_models(reg)[0]["versions"] == [1]
    assert publish(bundles["b2"], "crash", root=reg, tracking="disabled") == 2
    assert load_model("crash@2", reg).registry["version"] == 2
    assert [e["version"] for e in history("crash", reg) if e["event"] == "publish"] == [1, 2]


def test_a_held_lock_is_reported(tmp_path):
    "A lock held by a live process is waited for, then refused with a message naming the lock file."
    d = tmp_path / "registry" / "busy"
    held = tmp_path / "held"
    code = (
        "import sys, time; from pathlib import Path; from hsml.registry import registry_lock\n"
        "with registry_lock(Path(sys.argv[1])):\n    Path(sys.argv[2]).write_text('x'); time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(d), str(held)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert p.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
            time.sleep(0.05)
        with pytest.raises(HsmlError, match=r"registry entry .*busy is locked \(.*\.lock\)") as e:
            with registry_lock(d, timeout=0.5):
                pass
        assert f"{p.pid}@{socket.gethostname()}" in e.value.hint  # who holds it
        # the holder's lock is untouched
        assert (d / ".lock").read_text() == f"{p.pid}@{socket.gethostname()}"
    finally:
        p.kill()
        p.wait()


def test_an_empty_lock_left_by_a_kill_does_not_block(bundles, tmp_path):
    "A publisher killed between creating .lock and writing its pid left an empty file: the next publish must not wait on it."
    reg = tmp_path / "registry"
    (reg / "e").mkdir(parents=True)
    (reg / "e" / ".lock").write_text("")
    assert publish(bundles["b2"], "e", root=reg, tracking="disabled") == 1
    with registry_lock(reg / "e", timeout=0.5):
        pass


def test_tampered_versions_are_refused(bundles, tmp_path):
    reg = tmp_path / "registry"
    publish(bundles["b2"], "t", root=reg, tracking="disabled")
    publish(bundles["b2"], "t", root=reg, tracking="disabled")
    publish(bundles["b2"], "t", root=reg, tracking="disabled")
    m1 = reg / "t" / "versions" / "1" / "model"
    data = bytearray((m1 / "model.joblib").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (m1 / "model.joblib").write_bytes(bytes(data))
    with pytest.raises(HsmlError, match=r"tampered.*model\.joblib"):
        load_model("t@1", reg)
    p = cli(reg, "show", "t@1")
    assert "verified   NO" in p.stdout and "model.joblib" in p.stdout
    with pytest.raises(HsmlError, match="tampered"):
        promote("t", 1, "production", root=reg, tracking="disabled")
    # forged hashes.json: the files verify against it, but not against the digest recorded at publish
    m2 = reg / "t" / "versions" / "2" / "model"
    (m2 / "metrics.json").write_text('{"test": {"roc_auc": {"value": 0.99}}}')
    h = json.loads((m2 / "hashes.json").read_text())
    h["metrics.json"] = sha256_file(m2 / "metrics.json")
    (m2 / "hashes.json").write_text(json.dumps(h))
    load_bundle(m2)  # the bundle alone cannot tell
    with pytest.raises(HsmlError, match="digest recorded at publish time"):
        load_model("t@2", reg)
    # a missing file
    m3 = reg / "t" / "versions" / "3" / "model"
    (m3 / "input_schema.json").unlink()
    with pytest.raises(HsmlError, match="incomplete"):
        load_model("t@3", reg)
    # a tampered source is never published
    src = tmp_path / "src"
    demo_bundle(src, "logreg", n=200)
    (src / "bundle.json").write_text("{}")
    with pytest.raises(HsmlError, match="tampered"):
        publish(src, "t", root=reg, tracking="disabled")
    assert list_models(reg)[0]["versions"] == [1, 2, 3]


def test_wandb_model_artifact_carries_the_alias(bundles, tmp_path):
    from hsml.tracking import read_wandb_records

    reg = tmp_path / "registry"
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import sys, json; from hsml.registry import publish, promote; "
        "v = publish(sys.argv[1], 'wb', root=sys.argv[2], tracking='offline'); "
        "e = promote('wb', v, 'production', root=sys.argv[2], tracking='offline'); print(json.dumps(e))"
    )
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")} | {"HOME": str(home)}
    p = subprocess.run(
        [sys.executable, "-c", code, str(bundles["b2"]), str(reg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    event = json.loads(p.stdout.strip().splitlines()[-1])
    run_file = Path(event["wandb_run_file"])
    assert run_file.is_relative_to(reg / ".wandb")
    arts = [r.artifact for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.name, a.type) for a in arts] == [("wb", "model")]
    assert {"production", "hsml-v1"} <= set(arts[0].aliases)
    files = {e.path for e in arts[0].manifest.contents}
    assert {"model.joblib", "hashes.json", "input_schema.json", "model_card.md"} <= files
    # the publish was logged too, and nothing went to the home directory
    runs = sorted((reg / ".wandb").rglob("run-*.wandb"))
    assert len(runs) == 2
    assert not any("wandb" in str(x).lower() for x in home.rglob("*")), list(home.rglob("*"))
    ev = [e for e in history("wb", reg) if e["event"] == "wandb"]
    assert len(ev) == 2
