"""Faults: concurrent and killed registry publishers/promoters leave the registry consistent; the next
operation repairs what a kill left behind."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hsml.bundle import demo_bundle
from hsml.registry import consistency_problems, history, list_models, promote, publish

PUBLISHER = """
import sys
from hsml.registry import publish
src, root, alias, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for _ in range(n):
    print(publish(src, "conc", root=root, tracking="disabled", alias=alias), flush=True)
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.mktemp("b") / "model", "logreg", n=300, name="conc")


def _publishers(bundle, root, aliases, n):
    return [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(bundle), str(root), a, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in aliases
    ]


def test_eight_publishers_with_aliases_keep_versions_gapless(bundle, tmp_path):
    procs = _publishers(bundle, tmp_path, [f"alias{i}" for i in range(8)], 3)
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    got = sorted(int(v) for o, _ in outs for v in o.split())
    assert got == list(range(1, 25))
    assert consistency_problems("conc", tmp_path) == []
    assert len(list_models(tmp_path)[0]["aliases"]) == 8
    assert sum(e["event"] == "promote" for e in history("conc", tmp_path)) == 24


@pytest.mark.parametrize("rounds", [int(os.environ.get("HSML_KILL_ROUNDS", "6"))])
def test_sigkill_publishers_at_random_moments(bundle, tmp_path, rounds):
    rng = random.Random(0)
    kills = 0
    for r in range(rounds):
        procs = _publishers(bundle, tmp_path, [f"a{r}", "prod", "staging"], 4)
        time.sleep(rng.uniform(0.2, 2.0))
        for p in procs:
            if p.poll() is None and rng.random() < 0.7:
                p.send_signal(signal.SIGKILL)
                kills += 1
        for p in procs:
            p.communicate(timeout=300)
    assert kills > 0
    v = publish(bundle, "conc", root=tmp_path, tracking="disabled")  # the next publish works and repairs
    promote("conc", v, "prod", root=tmp_path, tracking="disabled")
    assert consistency_problems("conc", tmp_path) == []
    print(f"{kills} publishers killed over {rounds} rounds; {v} versions, consistent")


# ---------------------------------------------------------------- killed `hsml train`

ROOT = Path(__file__).resolve().parents[1]
HSML = str(Path(sys.executable).parent / "hsml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
SLOW = os.environ.get("HSML_SLOW") == "1"
slow = [
    pytest.mark.slow,
    pytest.mark.skipif(not SLOW, reason="slow: set HSML_SLOW=1 (make test runs the short version)"),
]


def kill_tree(proc: subprocess.Popen) -> int:
    "SIGKILL `proc`'s process group and every descendant (a Jupyter kernel runs in a session of its own); return how many."
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs(procs, timeout=30)
    return len(procs)


def cells_started(run_dir: Path) -> int:
    "Code cells papermill has started in the run's temporary notebook (-1 before it exists)."
    for nb in run_dir.glob(".*.tmp/train.ipynb"):
        with contextlib.suppress(ValueError, OSError):  # papermill may be rewriting it
            cells = json.loads(nb.read_text())["cells"]
            return sum(
                c["cell_type"] == "code" and bool(c["metadata"].get("papermill", {}).get("start_time"))
                for c in cells
            )
    return -1


def finalized(run_dir: Path) -> bool:
    "The run wrote its manifest into its temporary directory and has not been renamed yet."
    return any(run_dir.glob(".*.tmp/manifest.json"))


def kill_when(cmd: list[str], ready, delay: float, timeout: float = 600) -> dict:
    "Start `cmd` in its own process group; SIGKILL the tree `delay` s after `ready()` turns true; what happened."
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    t0 = time.monotonic()
    while proc.poll() is None and not ready() and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return {"killed": False, "returncode": proc.returncode, "after": round(time.monotonic() - t0, 2)}
    return {"killed": True, "processes": kill_tree(proc), "after": round(time.monotonic() - t0, 2)}


def complete_run(d: Path) -> bool:
    "A published run directory: manifest (its own run id, finished), timings, config and a verified bundle."
    from hsml.bundle import verify_bundle

    man = json.loads((d / "manifest.json").read_text())
    verify_bundle(d / "model")
    return (
        man["run_id"] == d.name
        and bool(man["finished_at"])
        and (d / "timings.json").exists()
        and (d / "config.yaml").exists()
    )


def check_after_kill(run_dir: Path, reg: Path, name: str) -> dict:
    "Published runs are complete; the registry is consistent (temporaries of a killed publish are repaired by the next one)."
    runs = [d for d in run_dir.iterdir() if not d.name.startswith(".")]
    assert all(complete_run(d) for d in runs), runs
    problems = (
        [p for p in consistency_problems(name, reg) if not p.startswith("left over")]
        if (reg / name).exists()
        else []
    )
    assert problems == []
    versions = list_models(reg)[0]["versions"] if (reg / name).exists() else []
    orphans = []  # registered versions whose run directory never appeared
    for v in versions:
        src = Path(json.loads((reg / name / "versions" / str(v) / "version.json").read_text())["source"])
        if not (src / "manifest.json").exists():
            orphans.append(v)
    assert orphans == [], f"versions {orphans} registered from runs that never appeared"
    return {"runs": len(runs), "versions": len(versions), "orphans": orphans,
            "temporaries": len(list(run_dir.glob(".*.tmp")))}  # fmt: skip


def train_cmd(run_dir: Path, reg: Path, data: Path) -> list[str]:
    return [HSML, "train", "-m", "logreg", "-p", f"data_dir={data}", "-p", "n_boot=20", "-p", "register=true",
            "-p", f"registry={reg}", "-p", f"run_dir={run_dir}", "-p", "tracking=offline"]  # fmt: skip


def kill_points(n: int) -> list[tuple[str, int | None, float]]:
    "`n` kill points spread over the run: before the kernel, at the start of code cells (plus a seeded delay), after finalize."
    nb = json.loads((ROOT / "experiments" / "train.ipynb").read_text())
    n_code = sum(c["cell_type"] == "code" for c in nb["cells"]) + 1  # + papermill's injected parameters
    rng = random.Random(12)
    cells = [min(n_code, 1 + round((i + 0.5) * n_code / (n - 2))) for i in range(n - 2)]
    return [
        ("launch", None, 0.5),
        *[("cell", k, rng.uniform(0, 0.8)) for k in cells],
        ("finalized", None, 0.0),
    ]


def run_train_kills(sample_dir: Path, tmp_path: Path, n: int) -> list[dict]:
    run_dir, reg, name = tmp_path / "runs", tmp_path / "reg", "conversion-logreg"
    run_dir.mkdir()
    cmd, found = train_cmd(run_dir, reg, sample_dir), []
    for what, k, delay in kill_points(n):
        ready = {
            "launch": lambda: True,
            "cell": lambda k=k: cells_started(run_dir) >= k,
            "finalized": lambda: finalized(run_dir),
        }[what]
        got = kill_when(cmd, ready, delay)
        found.append({"point": f"{what} {k or ''}".strip(), **got, **check_after_kill(run_dir, reg, name)})
        print(found[-1])
    before = check_after_kill(run_dir, reg, name)
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    after = check_after_kill(run_dir, reg, name)
    assert after["runs"] == before["runs"] + 1 and after["temporaries"] == 0  # the next run cleaned up
    assert consistency_problems(name, reg) == []
    return found


def test_sigkill_train_short(sample_dir, tmp_path):
    found = run_train_kills(sample_dir, tmp_path, 3)
    assert sum(f["killed"] for f in found) >= 2
