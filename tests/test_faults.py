"""Faults: concurrent and killed registry publishers/promoters leave the registry consistent; the next
operation repairs what a kill left behind."""

import os
import random
import signal
import subprocess
import sys
import time

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
