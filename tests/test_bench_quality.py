"""Smoke test of benchmarks/quality_fmnist.py: its core functions on a tiny Fashion-MNIST subset (skipped when the
Debian package dataset-fashion-mnist is not installed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality_fmnist as qf  # noqa: E402

pytestmark = pytest.mark.skipif(not qf.dataset_available(), reason=f"{qf.DATA_PACKAGE} is not installed")


def test_missing_dataset_names_the_package(tmp_path):
    with pytest.raises(qf.DatasetMissing, match="dataset-fashion-mnist"):
        qf.load_fmnist(tmp_path)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than 2 on a shared 2-core machine
    yield
    torch.set_num_threads(old)


def test_rows_on_a_tiny_subset(tmp_path, one_thread):
    data = qf.load_fmnist(train_limit=512, test_limit=256, val=200)
    assert data.xtr.shape == (512, 1, 28, 28) and data.xte.shape[0] == 256 and int(data.ytr.max()) <= 9
    budget = qf.Budget(base_steps=4, batch=32, ft_steps=2, calib_batches=1, sched_steps=2, lat_repeats=1)
    build = lambda: qf.SmallResNet(widths=(8, 16, 32), stem=8)  # noqa: E731
    base, info = qf.baseline("resnet", data, budget, "cpu", cache=tmp_path, build=build)
    assert not info["cached"] and list(tmp_path.glob("fmnist_resnet_*.pt"))
    again, info2 = qf.baseline("resnet", data, budget, "cpu", cache=tmp_path, build=build)
    assert info2["cached"] and all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                                     again.state_dict().values()))
    ctx = qf.Ctx("resnet", 0.5, data, budget, "cpu", global_pruning=False, round_to=1)
    acc = ctx.acc(base)
    base_row = {"model": "resnet", "target": 1.0, "method": "baseline", "side": "baseline", "criterion": None,
                "status": "ok", "acc_baseline": acc, "acc_pruned": acc, "acc_finetuned": acc, "ft_steps": 0,
                "wall_s": 0.0, "macs_ratio": 1.0, "params_ratio": 1.0, **qf.measure(base, ctx)}
    methods = {m.name: m for m in qf.METHODS}
    chosen = ["pk:l2", "tp:l2" if qf._tp_missing() is None else "pk-sched:linear"]
    rows = [base_row]
    for name in chosen:
        row = qf.run_row(methods[name], ctx, base, base_row)
        assert row["status"] == "ok", row.get("note")
        for key in ("acc_pruned", "acc_finetuned", "macs", "params", "lat_b1_ms", "lat_b64_ms", "wall_s",
                    "macs_ratio", "params_ratio", "ft_steps"):
            assert key in row, key
        assert 0.0 <= row["acc_pruned"] <= 1.0 and 0.0 <= row["acc_finetuned"] <= 1.0
        assert row["ft_steps"] == budget.ft_steps
        assert row["meets_target"] and row["macs"] <= 0.5 * base_row["macs"]
        assert row["macs_ratio"] > 0.3  # met closely, not by pruning everything
        rows.append(row)
    todo = qf.run_row(qf.Method("pk:absent", "prunekit", None, qf.dense_finetune, lambda: "TODO: not there"), ctx,
                      base, base_row)
    assert todo["status"] == "todo"
    meta = dict(qf.provenance(qf.parse_args([]), "cpu"), budget=qf.asdict(budget), quick=True,
                global_pruning=False, round_to=1, targets=[0.5], n_train=512, n_test=256)
    out = tmp_path / "res"
    qf.write_outputs(out, meta, rows + [todo])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == 4 and set(saved["summary"]) == {"prunekit_better", "ties", "tp_better"}
    md = out.with_suffix(".md").read_text()
    assert "keep 50% of FLOPs" in md and "pk:l2" in md and "TODO: not there" in md
