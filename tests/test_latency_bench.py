"""benchmarks/latency.py at toy size: one JSON file per network with the MAC ratios and the
latency ratios (positive, finite), an existing file kept unless --force, a Markdown table; and
the latency model's accuracy script and the convolution throughput script at toy size."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from lightning_prune.core.cost.latency_measure import CALIBRATION_FRACTIONS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str = "latency"):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_toy_run_writes_one_json_per_network_with_positive_finite_ratios(tmp_path: Path, capsys) -> None:
    latency = _script()
    threads = torch.get_num_threads()
    records = latency.main(["--toy", "--models", "resnet20", "--out", str(tmp_path)])
    torch.set_num_threads(threads)
    path = tmp_path / "resnet20-toy.json"
    assert [p.name for p in tmp_path.iterdir()] == ["resnet20-toy.json"]
    record = json.loads(path.read_text())
    assert record == json.loads(json.dumps(records[0]))
    assert record["network"] == "ResNet-20" and record["toy"] is True and record["threads"] == 1
    assert record["batches"] == [1, 4]
    # at most 1/2 and 1/4 of the dense MACs
    macs = record["macs"]
    assert set(macs) == {"dense", "2x", "4x"} and macs["2x"] <= macs["dense"] / 2 and macs["4x"] <= macs["dense"] / 4
    rows = record["rows"]
    assert {(r["batch"], r["runtime"], r["pruned"]) for r in rows} == {
        (b, r, p) for b in (1, 4) for r in ("eager", "inference", "onnxruntime") for p in ("2x", "4x")
    }
    for r in rows:
        assert all(_positive(r[key]) for key in ("mac_ratio", "speedup", "speedup_per_mac_ratio")), r
        assert r["mac_ratio"] == macs["dense"] / macs[r["pruned"]] >= {"2x": 2, "4x": 4}[r["pruned"]]
        assert math.isclose(r["speedup_per_mac_ratio"], r["speedup"] / r["mac_ratio"])
        assert r["spread"] >= 0
    exports = record["export_rows"]
    assert {(r["batch"], r["variant"]) for r in exports} == {(b, v) for b in (1, 4) for v in ("dense", "2x", "4x")}
    assert all(_positive(r["inference_over_eager"]) and _positive(r["onnxruntime_over_eager"]) for r in exports)
    out = capsys.readouterr().out
    assert "| ResNet-20 | 4 | onnxruntime | 4x |" in out and "| ResNet-20 | 1 | dense |" in out
    # an existing result is kept and reported, not measured again
    before = path.stat().st_mtime_ns
    again = latency.main(["--toy", "--models", "resnet20", "--out", str(tmp_path)])
    assert path.stat().st_mtime_ns == before and again[0] == record
    assert "| ResNet-20 | 1 | eager | 2x |" in capsys.readouterr().out


def test_latency_model_script_compares_predictions_with_measurements(tmp_path: Path, capsys) -> None:
    script = _script("latency_model")
    threads = torch.get_num_threads()
    script.main(["--batch", "2", "--repeats", "1", "--seeds", "1", "--models", "resnet20_mixed", "--out", str(tmp_path)])
    torch.set_num_threads(threads)
    result = json.loads((tmp_path / "model_resnet20_mixed.json").read_text())
    assert result["residual"] == "mixed" and len(result["rows"]) == len(script.FRACTIONS)
    for row in result["rows"]:
        assert _positive(row["predicted_ms"]) and _positive(row["measured_ms"])
        assert row["predicted_over_measured"] == row["predicted_ms"] / row["measured_ms"]
        assert row["macs"] < result["dense"]["macs"]
    assert set(result["fit"]["calibration_measured_ms"]) == {f"{f:g}" for f in CALIBRATION_FRACTIONS}
    assert result["max_abs_error"] == max(abs(r["predicted_over_measured"] - 1) for r in result["rows"])
    assert "| resnet20_mixed | median abs. error" in capsys.readouterr().out


def test_conv_throughput_script(tmp_path: Path, capsys) -> None:
    script = _script("conv_throughput")
    threads = torch.get_num_threads()
    script.main(["--batch", "2", "--repeats", "1", "--out", str(tmp_path / "conv.json")])
    torch.set_num_threads(threads)
    result = json.loads((tmp_path / "conv.json").read_text())
    assert len(result["rows"]) == len(script.CHANNELS) * len(script.SIZES)
    for row in result["rows"]:
        expected = row["channels"] ** 2 * 9 * row["size"] ** 2 * 2 / 1e6 / row["ms"]
        assert _positive(row["mmacs_per_ms"]) and math.isclose(row["mmacs_per_ms"], expected)
    assert "| 32x32 |" in capsys.readouterr().out
