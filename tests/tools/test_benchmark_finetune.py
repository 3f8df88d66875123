"""Smoke test of tools/benchmark_finetune.py with tiny settings."""

import json
import os
import subprocess
import sys
from conftest import REPO_ROOT

DATA = os.path.join(REPO_ROOT, "keras_chex", "data", "cifar10_sample.zip")


def _run(*args):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools",
                                      "benchmark_finetune.py"),
         "--depth=8", "--train_per_class=16", "--val_per_class=8",
         "--pretrain_epochs=2", "--finetune_epochs=2", "--threads=1",
         f"--data={DATA}", *args],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def test_pretrain_then_finetune_with_and_without_distillation(tmp_path):
    output = tmp_path / "out.jsonl"
    run_dir = tmp_path / "run"
    # From scratch, narrow needs the dense MACs only, so it can run
    # alongside the pre-training: first, without the checkpoint.
    _run("--variants=narrow_K", f"--run_dir={run_dir}", f"--output={output}")
    assert not (run_dir / "resnet8_dense.keras").exists()
    _run("--stage=pretrain", f"--run_dir={run_dir}", f"--output={output}")
    assert (run_dir / "resnet8_dense.keras").exists()
    _run("--variants=chex_kd,dense,l1", f"--run_dir={run_dir}",
         f"--output={output}")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    results = {r["variant"]: r for r in lines if "variant" in r}
    assert 0.4 < results["narrow_K"]["macs_fraction"] <= 0.5 + 1e-9
    assert results["narrow_K"]["epochs"] == 2
    assert set(results) == {"pretrain", "chex_kd", "narrow_K", "dense", "l1"}
    assert results["chex_kd"]["distill"] is True
    assert results["chex_kd"]["macs_fraction"] <= 0.5 + 1e-9
    assert results["narrow_K"]["macs_fraction"] <= 0.5 + 1e-9
    assert 0.4 < results["l1"]["macs_fraction"] <= 0.5 + 1e-9
    assert results["dense"]["macs_fraction"] == 1.0
    for name in ("chex_kd", "narrow_K", "dense", "l1"):
        assert len(results[name]["accuracy_per_epoch"]) == 2
        assert 0.0 <= results[name]["val_accuracy"] <= 1.0
    # Each compact is kept for timing later.
    saved = sorted(os.listdir(run_dir / "models"))
    assert saved == sorted(f"r8_{n}_f0.5_seed0.keras"
                           for n in ("chex_kd", "narrow_K", "dense", "l1"))
    # Options go into the file name, so they never replace a default run.
    _run('--variants=smcp', '--options={"importance": "magnitude"}',
         f"--run_dir={run_dir}", f"--output={output}")
    assert (run_dir / "models"
            / "r8_smcp[importance=magnitude]_f0.5_seed0.keras").exists()
    # Every compact timed against the dense checkpoint.
    _run("--stage=latency", "--latency_rounds=1", f"--run_dir={run_dir}",
         f"--output={output}")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    timed = {r["file"]: r for r in lines if r.get("stage") == "latency"}
    assert set(timed) == set(os.listdir(run_dir / "models"))
    for r in timed.values():
        assert r["median_ms"] > 0 and r["latency_fraction"] > 0
    # The summary pairs the seeds and adds the timing as a column.
    summary = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "chex_results.py"),
         str(output), "--reference=dense",
         "--variants=dense,l1,smcp[importance=magnitude]"],
        capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0, summary.stderr[-3000:]
    header, _, *rows = summary.stdout.strip().splitlines()
    assert "LiteRT latency / dense" in header
    assert [r.split("|")[1].strip() for r in rows] == [
        "dense", "l1", "smcp[importance=magnitude]"]
    assert all(r.split("|")[-2].strip() != "-" for r in rows)
