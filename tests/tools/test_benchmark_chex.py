"""Smoke tests of the CHEX benchmark scripts in tools/, with tiny settings."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT


def _run(script, *args):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", script), *args],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmark_chex_runs_every_variant_on_the_same_budget(tmp_path):
    output = tmp_path / "bench.jsonl"
    _run("benchmark_chex.py", "--depth=8", "--epochs=2",
         "--train_per_class=20", "--val_per_class=5", "--interval=0.5",
         "--warmup_epochs=0.5", "--threads=1",
         "--variants=dense,narrow,fixed,noregrow,chex,frs,l1",
         f"--output={output}")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    header, results = lines[0], {r["variant"]: r for r in lines[1:]}
    assert header["train_images"] == 200 and header["val_images"] == 50
    assert "--warmup_epochs=0.5" in header["command"]
    # The CPU model, so that results pair only within one machine kind.
    assert header["cpu"] and header["cpu"] != "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert header["cpu"] in f.read()
    assert all(r["warmup_epochs"] == 0.5 for r in results.values())
    assert set(results) == {"dense", "narrow", "fixed", "noregrow", "chex",
                            "frs", "l1"}
    assert results["dense"]["macs_fraction"] == 1.0
    for name in ("narrow", "fixed", "noregrow", "chex", "frs", "l1"):
        assert 0.45 <= results[name]["macs_fraction"] <= 0.5, name
        assert 0.0 <= results[name]["val_accuracy"] <= 1.0
    # Widths are read from the stripped model: every pruned variant is
    # narrower than dense somewhere and never wider anywhere.
    dense = results["dense"]["conv_filters"]
    for name in ("fixed", "noregrow", "chex"):
        widths = results[name]["conv_filters"]
        assert len(widths) == len(dense)
        assert all(w <= d for w, d in zip(widths, dense)) and widths != dense
    # FRS and its L1 ablation: same schedule and target, another
    # criterion, so other widths.
    assert results["frs"]["conv_filters"] != results["l1"]["conv_filters"]


def test_benchmark_chex_overhead_reports_interleaved_rounds():
    text = _run("benchmark_chex_overhead.py", "--depth=8", "--epochs=4",
                "--train_per_class=26", "--rounds=1", "--interval=1",
                "--threads=1")
    assert "Command: `python" in text
    rows = [line for line in text.splitlines()
            if re.match(r"\| 1 +\|", line)]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    plain, chex, ratio = float(cells[1]), float(cells[2]), float(cells[3])
    assert abs(ratio - chex / plain) < 0.01
    assert int(cells[7]) == 3  # epochs 1, 2 and 2.88 (until=0.72)
    assert float(cells[8]) > 0 and float(cells[9]) > 0
    assert re.search(r"median ratio: fit [0-9.]+, steady-state epoch", text)


def test_benchmark_chex_overhead_times_smcp_too():
    text = _run("benchmark_chex_overhead.py", "--depth=8", "--epochs=4",
                "--train_per_class=26", "--rounds=1", "--threads=1",
                "--method=smcp")
    rows = [line for line in text.splitlines()
            if re.match(r"\| 1 +\|", line)]
    assert len(rows) == 1 and "SMCP fit s" in text
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert int(cells[7]) > 1  # Recomputations ran and were timed.


def test_benchmark_chex_overhead_times_relevance_pruning():
    text = _run("benchmark_chex_overhead.py", "--depth=8", "--epochs=4",
                "--train_per_class=26", "--rounds=1", "--interval=1",
                "--threads=1", "--method=frs")
    rows = [line for line in text.splitlines()
            if re.match(r"\| 1 +\|", line)]
    assert len(rows) == 1 and "FRS fit s" in text
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # Ends of epochs 1 and 2, and the freeze step at 0.75 of the fit.
    assert int(cells[7]) == 3 and float(cells[8]) > 0


def test_chex_results_pairs_seeds(tmp_path):
    records = [
        {"command": "header line, skipped"},
        {"variant": "chex_max", "seed": 0, "val_accuracy": 0.80},
        {"variant": "chex_max", "seed": 1, "val_accuracy": 0.70},
        {"variant": "fixed", "seed": 0, "val_accuracy": 0.75},
        {"variant": "fixed", "seed": 1, "val_accuracy": 0.60},
        {"variant": "fixed", "seed": 2, "val_accuracy": 0.10},  # Unpaired.
        {"variant": "narrow", "seed": 1, "val_accuracy": 0.90},
        {"variant": "narrow", "seed": 1, "val_accuracy": 0.72},  # Last wins.
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = _run("chex_results.py", str(path), "--rename=chex_max=chex",
               "--variants=chex,fixed,narrow")
    rows = {line.split("|")[1].strip(): [c.strip() for c in
                                         line.split("|")[2:-1]]
            for line in out.splitlines()[2:]}
    assert rows["chex"][:5] == ["80.00", "70.00", "-", "75.00", "7.07"]
    # fixed: mean over its three seeds; paired only on seeds 0 and 1.
    assert rows["fixed"][3] == "48.33"
    # Paired differences 5 and 10: mean 7.5, sd 3.54, t = 7.5 / 2.5 = 3.
    assert rows["fixed"][5:] == ["+7.50", "2 of 2", "+3.00"]
    assert rows["narrow"][1] == "72.00"
    assert rows["narrow"][5:] == ["-2.00", "0 of 1", "-"]


def test_chex_results_widths_per_stage(tmp_path):
    import keras

    from keras_chex.cifar.resnet import cifar_resnet

    names = [layer.name for layer in cifar_resnet(20).layers
             if isinstance(layer, keras.layers.Conv2D)]
    # Each conv's "width" is its position, so the table shows which conv
    # every cell was read from.
    records = [{"variant": "chex", "seed": s, "val_accuracy": 0.5,
                "conv_filters": [i + 100 * s for i in range(len(names))]}
               for s in (0, 1)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = _run("chex_results.py", str(path), "--widths", "--variants=chex")
    row = [line for line in out.splitlines()
           if line.startswith("| chex") and "/" in line][0]
    cells = [c.strip() for c in row.split("|")[2:-1]]

    def at(name):  # Mean of seeds 0 and 1: position + 50.
        return str(names.index(name) + 50)

    expected = []
    for stage in (1, 2, 3):
        stream = at("stem_conv" if stage == 1
                    else f"stage{stage}_block1_shortcut_conv")
        inner = ",".join(at(f"stage{stage}_block{b}_conv1")
                         for b in (1, 2, 3))
        expected.append(f"{stream} / {inner}")
    assert cells == expected


def test_chex_results_plots_each_layers_mean_width(tmp_path):
    n = 21  # Convolutions of a ResNet-20.
    records = [{"variant": v, "seed": s, "val_accuracy": 0.5,
                "conv_filters": [w + s] * n}
               for v, w in (("chex", 10), ("narrow", 4)) for s in (0, 1)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    png = tmp_path / "widths.png"
    out = _run("chex_results.py", str(path), f"--plot={png}",
               "--variants=narrow,chex")
    # Seed means 10.5 and 4.5 per convolution, in --variants order.
    assert (f"wrote {png}: narrow (21 convolutions, {4.5 * n:.0f} channels)"
            f", chex (21 convolutions, {10.5 * n:.0f} channels)") in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "chex_results.py"),
         str(path), f"--plot={png}"], capture_output=True, text=True)
    assert result.returncode != 0 and "exists" in result.stderr
    assert png.read_bytes() == before


def test_benchmark_chex_runs_the_latency_variants_and_times_them(tmp_path):
    output = tmp_path / "bench.jsonl"
    table = tmp_path / "table.json"
    _run("benchmark_chex.py", "--depth=8", "--epochs=2",
         "--train_per_class=20", "--val_per_class=5", "--threads=1",
         "--variants=smcp,chex_latency,frs_latency",
         "--latency=0.6", "--interval=0.5",
         f"--latency_table={table}", "--measure_latency",
         f"--output={output}")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    results = {r["variant"]: r for r in lines[1:]}
    assert set(results) == {"smcp", "chex_latency", "frs_latency"}
    assert table.exists()
    for r in results.values():
        assert r["latency_ms"] > 0 and r["dense_latency_ms"] > 0
        assert r["predicted_ms"] > 0
    # The latency budget holds as the table predicts it.
    dense_predicted = keras_predicted_dense(table)
    assert results["smcp"]["predicted_ms"] <= 0.6 * dense_predicted + 1e-9
    # A stripped compact has lost which dense layer each of its layers came
    # from, so the table prices a narrowed layer by the smallest measured
    # entry of the same computation that covers it, which may be another
    # layer's measurement than the one the method priced it with (seen:
    # 0.616 predicted for 0.599 as the method priced it). Within 5%, not
    # exactly; the benchmark measures the real latency.
    for name in ("chex_latency", "frs_latency"):
        assert results[name]["predicted_ms"] <= 0.6 * dense_predicted * 1.05, (
            name)


def keras_predicted_dense(table_path):
    import keras

    import keras_chex
    from keras_chex.cifar.resnet import cifar_resnet

    keras.utils.set_random_seed(0)
    table = keras_chex.LatencyTable.load(str(table_path))
    return table.predict(cifar_resnet(8))


_RECALIBRATE_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import keras
import numpy as np
import tensorflow as tf
import bn_recalibration as tool

model = keras.Sequential([keras.Input((3,)),
                          keras.layers.BatchNormalization(momentum=0.9)])
rng = np.random.default_rng(0)
batches = [rng.normal(i, 1 + i, size=(16, 3)).astype("float32")
           for i in range(4)]
ds = tf.data.Dataset.from_tensor_slices((np.stack(batches),
                                         np.zeros((4, 16))))
assert tool.recalibrate(model, ds, batches=3) == 1
bn = model.layers[0]
np.testing.assert_allclose(
    bn.moving_mean.numpy(), np.mean([b.mean(0) for b in batches[:3]], 0),
    rtol=1e-5)
np.testing.assert_allclose(
    bn.moving_variance.numpy(), np.mean([b.var(0) for b in batches[:3]], 0),
    rtol=1e-4)
assert bn.momentum == 0.9  # Put back.
print("checked")
"""


def test_bn_recalibration_averages_the_batch_statistics():
    # In a subprocess: the tool defines absl flags (`--data`, ...) that
    # other tools loaded by this test session define too.
    result = subprocess.run(
        [sys.executable, "-c", _RECALIBRATE_CHECK,
         os.path.join(REPO_ROOT, "tools")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("checked")


def test_bn_recalibration_reports_saved_models(tmp_path):
    from keras_chex.cifar.resnet import cifar_resnet

    cifar_resnet(8).save(tmp_path / "m.keras")
    text = _run("bn_recalibration.py", "--batches=2", "--val_per_class=10",
                str(tmp_path / "m.keras"))
    (line,) = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
    assert line["model"] == "m.keras" and line["batchnorms"] == 9  # Stem + 2 per block + 2 shortcuts
    assert 0 <= line["accuracy_saved"] <= 1
    assert abs(line["difference"] - (line["accuracy_recalibrated"]
                                     - line["accuracy_saved"])) < 1e-9


def test_a_chex_ablation_runs_with_recalibrated_statistics(tmp_path):
    output = tmp_path / "bench.jsonl"
    _run("benchmark_chex.py", "--depth=8", "--epochs=2",
         "--train_per_class=20", "--val_per_class=5", "--interval=0.5",
         "--threads=1", "--recalibrate_batches=2", "--variants=chex_knapsack",
         f"--output={output}")
    (result,) = [json.loads(line) for line in output.read_text().splitlines()
                 if '"variant"' in line]
    assert result["variant"] == "chex_knapsack"
    assert result["recalibrate_batches"] == 2
    assert 0.4 <= result["macs_fraction"] <= 0.5
    # The line carries the arguments the method stored, switch included.
    assert result["pruning_config"]["allocator"] == "knapsack"


_VARIANT_CONFIGS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from absl import flags
import keras_chex
import benchmark_chex as tool
from keras_chex.cifar.resnet import cifar_resnet

flags.FLAGS(["benchmark_chex"])
for name in sys.argv[2:]:
    model = keras_chex.prune_and_regrow(cifar_resnet(8), flops=0.5, seed=0,
                                        **tool.chex_options(name))
    print(json.dumps({"variant": name, "config": model.pruning_config}))
"""


def test_every_chex_ablation_sets_its_switch():
    # The other ablations run the same code as chex_knapsack above with
    # other arguments (each switch is trained in tests/methods/chex): here
    # each name is checked to reach the method as the switch it names.
    names = ["chex", "fixed", "chex16", "chex_regrow0.1", "chex_interval3",
             "chex_until0.4", "chex_min0.1", "chex_uniform", "chex_merit",
             "chex_streams", "chex_slim1e-4"]
    result = subprocess.run(
        [sys.executable, "-c", _VARIANT_CONFIGS,
         os.path.join(REPO_ROOT, "tools"), *names],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    configs = {r["variant"]: r["config"] for r in map(
        json.loads, result.stdout.strip().splitlines())}
    assert list(configs) == names
    default = configs["chex"]
    assert default["regrow"] == 0.3 and default["round_to"] == 1

    def switched(name):
        return {k: v for k, v in configs[name].items() if default[k] != v}

    assert switched("fixed") == {"regrow": 0.0}
    assert switched("chex16") == {"round_to": 16}
    assert switched("chex_regrow0.1") == {"regrow": 0.1}
    assert switched("chex_interval3") == {"interval": 3.0}
    assert switched("chex_until0.4") == {"until": 0.4}
    assert switched("chex_min0.1") == {"min_channels": 0.1}
    assert switched("chex_uniform") == {"allocator": "uniform"}
    assert switched("chex_merit") == {"pruned_importance": "last"}
    assert switched("chex_streams") == {"streams": "keep"}
    assert switched("chex_slim1e-4") == {"gamma_l1": 1e-4}
