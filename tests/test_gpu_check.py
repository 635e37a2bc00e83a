"""``scripts/gpu-check``: its CPU mode end to end (a subset of its checks, to stay short), that a
failing check fails the script and is named, and that its shrunk honest config is valid.

The whole ``--cpu-small`` run (all five checks) took 3 min 56 s on a 2-core AMD EPYC Zen 3 (fp32,
one thread) and is run by hand; here ``cuda-tests`` and ``score-sde`` run, about 25 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import torch

from distpure.config import parse_overrides
from distpure.evaluation.config import load_experiment

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"


def gpu_check(out: Path, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The script run as a user runs it, with this interpreter."""
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_cpu_small_passes_and_writes_every_figure(require_shared, tmp_path):
    require_shared("fixtures/score-sde")
    done = gpu_check(tmp_path, "--cpu-small", "--only", "cuda-tests", "score-sde")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["mode"] == "cpu-small" and summary["failed"] == []
    assert summary["torch_version"] == torch.__version__ and summary["hardware"]["device"] == "cpu"
    assert set(summary["checks"]) == {"cuda-tests", "score-sde"}
    tests = summary["checks"]["cuda-tests"]["result"]
    assert tests["tests"] >= 9 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    score_sde = summary["checks"]["score-sde"]["result"]
    assert score_sde["config"]["size"] == "tiny" and score_sde["sde_steps"] == 10
    figures = summary["figures"]
    for name in ("score_sde_purification_images_per_second", "score_sde_gradient_seconds_per_draw",
                 "score_sde_purification_flops_per_second"):
        assert figures[name] > 0
    assert "passed in" in done.stdout


def test_a_failing_check_fails_the_script_and_is_named(tmp_path):
    """Without the score-SDE fixtures (data root elsewhere) the score-SDE check fails: exit 1,
    the check named on stderr and in the JSON."""
    done = gpu_check(tmp_path / "out", "--cpu-small", "--only", "score-sde",
                     env={"DISTPURE_DATA": str(tmp_path / "data")})
    assert done.returncode == 1
    assert "gpu-check FAILED: score-sde" in done.stderr
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert summary["failed"] == ["score-sde"] and not summary["checks"]["score-sde"]["ok"]


def test_shrunk_honest_config_is_valid_and_small():
    spec = spec_from_loader("gpu_check", SourceFileLoader("gpu_check", str(SCRIPT)))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    config = load_experiment(module.HONEST, parse_overrides(module.shrunk_honest_overrides()))
    assert config.evaluation.draws == 2
    purifiers = [d for d in config.defenses if d.kind == "purifier"]
    assert purifiers and all(config.purifier_config(d).num_steps == 2 for d in purifiers)
    attacks = [a for a in config.attacks if a.kind != "clean"]
    assert attacks and all(a.iterations == 2 and a.eot_draws == 1 for a in attacks)
