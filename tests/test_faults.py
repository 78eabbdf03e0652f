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
        # enough work that the publishers are still running when the kills come (a quick machine finished 4 each
        # before the first kill); the killed ones stop part-way, the others finish
        procs = _publishers(bundle, tmp_path, [f"a{r}", "prod", "staging"], 40)
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
slow_only = pytest.mark.skipif(
    not SLOW, reason="slow: set HSML_SLOW=1 (the default run has the short version)"
)


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


def _live_temporaries(run_dir: Path, inside: str) -> list[Path]:
    "`inside` in the temporary run directories whose writer is alive (a killed run's are left for the next run)."
    from hsml.core import TEMP_RE

    return [
        p / inside
        for p in run_dir.glob(".*.tmp")
        if psutil.pid_exists(int(TEMP_RE.match(p.name).group(1))) and (p / inside).exists()
    ]


def cells_started(run_dir: Path) -> int:
    "Code cells papermill has started in the run's temporary notebook (-1 before it exists)."
    for nb in _live_temporaries(run_dir, "train.ipynb"):
        with contextlib.suppress(ValueError, OSError):  # papermill may be rewriting it
            cells = json.loads(nb.read_text())["cells"]
            return sum(
                c["cell_type"] == "code" and bool(c["metadata"].get("papermill", {}).get("start_time"))
                for c in cells
            )
    return -1


def finalized(run_dir: Path) -> bool:
    "The run wrote its manifest into its temporary directory and has not been renamed yet."
    return bool(_live_temporaries(run_dir, "manifest.json"))


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
    """`n` kill points spread over the run: before the kernel, at the start of code cells (plus a seeded delay),
    after finalize (manifest written, not renamed) and, for n > 3, after the rename (bundle not registered yet)."""
    nb = json.loads((ROOT / "experiments" / "train.ipynb").read_text())
    n_code = sum(c["cell_type"] == "code" for c in nb["cells"]) + 1  # + papermill's injected parameters
    rng = random.Random(12)
    tail = [("finalized", None, 0.0)] + ([("published", None, 0.0)] if n > 3 else [])
    m = n - 1 - len(tail)
    cells = [min(n_code, 1 + round((i + 0.5) * n_code / m)) for i in range(m)]
    return [("launch", None, 0.5), *[("cell", k, rng.uniform(0, 0.8)) for k in cells], *tail]


def published_unregistered(run_dir: Path) -> bool:
    "A run directory was renamed into place and its bundle is not registered yet."
    for m in run_dir.glob("[!.]*/manifest.json"):
        with contextlib.suppress(ValueError, OSError):
            if "registered" not in json.loads(m.read_text()):
                return True
    return False


def run_train_kills(sample_dir: Path, tmp_path: Path, n: int) -> list[dict]:
    run_dir, reg, name = tmp_path / "runs", tmp_path / "reg", "conversion-logreg"
    run_dir.mkdir()
    cmd, found = train_cmd(run_dir, reg, sample_dir), []
    for what, k, delay in kill_points(n):
        ready = {
            "launch": lambda: True,
            "cell": lambda k=k: cells_started(run_dir) >= k,
            "finalized": lambda: finalized(run_dir),
            "published": lambda: published_unregistered(run_dir),
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


@pytest.mark.slow
@slow_only
def test_sigkill_train_20_points(sample_dir, tmp_path):
    n = 20
    found = run_train_kills(sample_dir, tmp_path, n)
    assert len(found) == n and sum(f["killed"] for f in found) >= n - 2


# ---------------------------------------------------------------- killed `hsml score`


@pytest.fixture(scope="module")
def trained(sample_dir, tmp_path_factory) -> Path:
    "A real run's bundle (logreg, the sample data) to score with."
    from hsml.runs import train_main

    params = {"model": "logreg", "data_dir": str(sample_dir), "n_boot": 20, "tracking": "disabled"}
    return train_main({**params, "run_dir": str(tmp_path_factory.mktemp("runs"))}, quiet=True) / "model"


def run_score_kills(bundle: Path, data: Path, tmp_path: Path, n: int) -> list[dict]:
    """Kill `hsml score` when its atomic write's temporary appears (which times a run, T), then at n - 1 moments
    spread over T: the list is absent or whole (equal to the next, unkilled run's)."""
    import polars as pl

    out = tmp_path / "lists" / "scores.csv"
    cmd = [HSML, "score", "--model", str(bundle), "--data-dir", str(data), "--out", str(out)]
    temporaries = lambda: list(out.parent.glob(".scores.csv.*.tmp"))  # noqa: E731
    found, left = [], []
    for i in range(n):
        out.unlink(missing_ok=True)
        if i == 0:
            got = kill_when(cmd, lambda: bool(temporaries()), 0.0)
            took = got["after"]
        else:
            got = kill_when(cmd, lambda: True, took * i / n)
        if out.exists():
            left.append(pl.read_csv(out))
        found.append(
            {**got, "list": "written" if out.exists() else "absent", "temporaries": len(temporaries())}
        )
        print(found[-1])
    out.unlink(missing_ok=True)
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)  # the next run works
    want = pl.read_csv(out)
    assert all(f.equals(want) for f in left)  # what a killed run left where the list goes is the whole list
    assert temporaries() == []  # ... and the next run removed what killed ones left
    return found


def test_sigkill_score_short(trained, sample_dir, tmp_path):
    found = run_score_kills(trained, sample_dir, tmp_path, 3)
    assert sum(f["killed"] for f in found) >= 2


@pytest.mark.slow
@slow_only
def test_sigkill_score_20_points(trained, sample_dir, tmp_path):
    found = run_score_kills(trained, sample_dir, tmp_path, 20)
    assert sum(f["killed"] for f in found) >= 15


# ---------------------------------------------------------------- killed `hsml registry publish/promote`

PROMOTER = """
import json, random, sys
from hsml.registry import promote
root, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for _ in range(n):
    e = promote("conc", rng.randint(1, 3), rng.choice(["prod", "staging", "canary"]), root=root, tracking="disabled")
    print(json.dumps({k: e[k] for k in ("ts", "alias", "version")}), flush=True)
"""


def test_sigkill_registry_cli_and_promoters(
    bundle, tmp_path, rounds=int(os.environ.get("HSML_KILL_ROUNDS", "4"))
):
    "`hsml registry publish` commands and promoter loops killed at random moments, six at a time: nothing confirmed is lost."
    reg, rng, kills, confirmed, raw = tmp_path / "reg", random.Random(1), 0, [], []
    for _ in range(3):
        publish(bundle, "conc", root=reg, tracking="disabled")
    d = reg / "conc"
    for r in range(rounds):
        procs = [
            subprocess.Popen([HSML, "registry", "publish", str(bundle), "--name", "conc", "--registry", str(reg), "--tracking", "disabled"],
                             cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ] + [
            subprocess.Popen([sys.executable, "-c", PROMOTER, str(reg), str(10 * r + i), "400"],
                             cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(4)
        ]  # fmt: skip
        time.sleep(rng.uniform(1.0, 4.0))
        for p in procs:
            if p.poll() is None and rng.random() < 0.8:
                kills += kill_tree(p) > 0
        outs = [p.communicate(timeout=300)[0] for p in procs]
        confirmed += [json.loads(line) for o in outs[2:] for line in o.splitlines() if line.startswith("{")]
        raw.append(consistency_problems("conc", reg))  # before any repair
        assert all(
            a["version"] in _versions_of(d)
            for a in (
                json.loads((d / "aliases.json").read_text()) if (d / "aliases.json").exists() else {}
            ).values()
        )
    promote(
        "conc", 1, "prod", root=reg, tracking="disabled"
    )  # the next operation repairs what the kills left
    assert consistency_problems("conc", reg) == []
    # nothing hidden is left but the lock file, which stays (empty when nobody holds it)
    assert [p.name for p in d.glob(".*")] == [".lock"] and (d / ".lock").read_text() == ""
    assert [p.name for p in (d / "versions").glob(".*")] == []
    events = {
        (e["ts"], e.get("alias"), e["version"]) for e in history("conc", reg) if e["event"] == "promote"
    }
    lost = [c for c in confirmed if (c["ts"], c["alias"], c["version"]) not in events]
    print(f"{kills} killed over {rounds} rounds; {len(confirmed)} promotes confirmed, {len(lost)} lost; "
          f"problems seen before repair: {sum(map(len, raw))} {[p for ps in raw for p in ps][:3]}")  # fmt: skip
    assert kills > 0 and confirmed and lost == []


def _versions_of(d: Path) -> list[int]:
    return list_models(d.parent)[0]["versions"]


# ---------------------------------------------------------------- a sweep worker killed mid-trial

SWEEPER = """
import json, sys
from hsml.sweep import run_sweep
r = run_sweep(json.loads(sys.argv[1]), progress=False)
print(json.dumps({"worker_trials": r.worker_trials, "n_trials": r.n_trials}))
"""


@pytest.mark.postgres
def test_sweep_worker_killed_mid_trial(sample_dir, tmp_path):
    "Two workers share a study on PostgreSQL; one is killed mid-trial: its trial is failed by heartbeat, retried once, and the other finishes the sweep."
    import optuna
    from optuna.trial import TrialState

    from hsml.sweep import storage_url
    from hsml.testing import local_postgres

    n_trials = 60  # the survivor must outlast the grace period: stale trials are failed when a trial starts
    with local_postgres() as url:
        base = {"model": "logreg", "n_trials": n_trials, "study_name": "beat", "storage": url, "data_dir": str(sample_dir),
                "run_dir": str(tmp_path), "tracking": "disabled", "heartbeat_interval": 1, "grace_period": 3}  # fmt: skip
        procs = [
            subprocess.Popen([sys.executable, "-c", SWEEPER, json.dumps({**base, "worker": w})], cwd=ROOT, env=ENV,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for w in (0, 1)
        ]  # fmt: skip
        storage, running, deadline = storage_url(url, tmp_path), [], time.monotonic() + 600
        while len(running) < 2 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
            with contextlib.suppress(Exception):  # the study does not exist yet
                study = optuna.load_study(study_name="beat", storage=storage)
                running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        assert len(running) == 2, "both workers are mid-trial"
        kill_tree(procs[0])  # worker 0 dies holding one of the two running trials
        out, err = procs[1].communicate(timeout=900)
        assert procs[1].returncode == 0, err[-3000:]
        trials = optuna.load_study(study_name="beat", storage=storage).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    print(f"killed mid-trial {running}; failed {[t.number for t in failed]}; retried as {[t.number for t in retries]}; "
          f"{len(trials)} trials, {sorted(t.state.name for t in trials)}")  # fmt: skip
    assert len(failed) == 1 and failed[0].number in running  # the dead worker's trial, and only it
    assert [t.system_attrs["failed_trial"] for t in retries] == [failed[0].number]
    assert (
        retries[0].state.is_finished() and retries[0].params == failed[0].params
    )  # retried once, same parameters
    assert all(t.state.is_finished() for t in trials) and len(trials) >= n_trials  # nothing left running
    assert (tmp_path / "beat" / "best_params.yaml").exists()  # the other worker finished the sweep


# ---------------------------------------------------------------- data changed under a run


def test_data_changed_between_check_and_build_is_an_error(sample_dir, tmp_path):
    "A file rewritten after the run checked the data and before it builds the training set stops the run, naming the file."
    import shutil

    import nbformat

    from hsml.core import HsmlError
    from hsml.runs import train_main

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    nb = nbformat.read(ROOT / "experiments" / "train.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if 'run.stage("data")' in c.source) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(
        f"with open({str(data / 'usage_actions.csv')!r}, 'a') as f:\n"
        "    f.write('2020-01-06 00:00:00.000,1,0,0,0,1,0,0,0,1\\n')  # an export lands in the data directory"
    ))  # fmt: skip
    nbformat.write(nb, tmp_path / "changing.ipynb")
    runs_dir = tmp_path / "runs"
    with pytest.raises(
        HsmlError, match=r"between the data check and the training-set build: .*usage_actions\.csv"
    ):
        train_main({"model": "logreg", "data_dir": str(data), "run_dir": str(runs_dir), "tracking": "disabled"},
                   notebook=tmp_path / "changing.ipynb", quiet=True)  # fmt: skip
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] == []
