"""benchmarks/latency.py at toy size: one JSON file per network with the MAC ratios and the
latency ratios (positive, finite), an existing file kept unless --force, a Markdown table."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def _script():
    spec = importlib.util.spec_from_file_location("latency_bench", SCRIPT)
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
