"""benchmarks/bar_overhead.py, benchmarks/channels_last.py and benchmarks/bf16_mixed.py at toy size: the JSON each writes holds
the medians it prints and their ratio, and a run too short to time anything is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str = "bar_overhead"):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_run_writes_the_medians_and_their_ratio(tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "overhead" / "lenet5.json"
    record = _script().main(["--model", "lenet5", "--rounds", "2", "--steps", "5", "--batch", "8", "--threads", "1", "--out", str(out)])
    torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == record
    assert record["model"] == "lenet5" and record["threads"] == 1 and record["batch"] == 8
    assert record["steps_timed"] == {"plain": 4, "gated": 4}  # 2 rounds x (5 steps - 3 warm-up)
    median = record["median_step_ms"]
    assert median["plain"] > 0 and median["gated"] > 0
    assert record["ratio"] == pytest.approx(median["gated"] / median["plain"])
    assert record["command"] == "python benchmarks/bar_overhead.py --model lenet5 --rounds 2 --steps 5 --batch 8 --threads 1 --out " + str(out)
    assert f"**{record['ratio']:.3f}**" in capsys.readouterr().out


def test_a_run_with_no_timed_step_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        _script().main(["--steps", "3"])
    assert "--steps above 3" in capsys.readouterr().err


@pytest.mark.parametrize("script, baseline, setting", [("channels_last", "contiguous", "channels_last"),
                                                       ("bf16_mixed", "float32", "bf16_mixed")])
def test_a_settings_toy_run_writes_the_medians_and_their_ratio(tmp_path: Path, capsys, script: str, baseline: str,
                                                               setting: str) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / script / "toy.json"
    argv = ["--models", "lenet5", "resnet20", "--rounds", "2", "--steps", "5", "--batch", "4", "--gates", "--out", str(out)]
    record = _script(script).main(argv)
    torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == record
    assert record["threads"] == 1 and record["batch"] == 4 and record["gates"] is True
    assert record["command"] == f"python benchmarks/{script}.py " + " ".join(argv)
    assert sorted(record["models"]) == ["lenet5", "resnet20"]
    printed = capsys.readouterr().out
    for model, result in record["models"].items():
        assert result["steps_timed"] == {baseline: 4, setting: 4}  # 2 rounds x (5 steps - 3 warm-up)
        median = result["median_step_ms"]
        assert result["speedup"] == pytest.approx(median[baseline] / median[setting])
        assert f"| {model} | {median[baseline]:.1f} | {median[setting]:.1f} | **{result['speedup']:.2f}x** |" in printed
    with pytest.raises(SystemExit):
        _script(script).main(["--steps", "2"])
    assert "--steps above 3" in capsys.readouterr().err


def test_the_bf16_variant_trains_under_bfloat16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """bar_overhead.run's ``precision`` reaches the Trainer: the network's forward sees bfloat16 autocast."""
    module = _script()
    seen = []
    factory, shape, cost = module.MODELS["lenet5"]

    def recording():
        net = factory()
        net.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        return net

    monkeypatch.setitem(module.MODELS, "lenet5", (recording, shape, cost))
    module.run("lenet5", False, steps=4, batch=4, channels_last=True, precision="bf16-mixed")
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    module.run("lenet5", False, steps=4, batch=4, channels_last=True)
    assert seen and set(seen) == {False}
