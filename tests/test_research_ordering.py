"""Trajectories in the right order, every checkpoint shown (issue 13, points 2 and 3).

Checkpoints without an ``epoch`` key in the layouts users have: ``ckpt_1.pth … ckpt_20.pth``,
``model_e5.pt``, Hugging Face ``checkpoint-500/pytorch_model.bin``, the CIFAR repos'
``ep0/ckpt.pth``; each is extracted into ONE ``-o`` and compared through the real CLI.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pandas as pd
import pytest
from helpers import runner, save_state_dict, write_cluster_npz

from nccli.cli import app
from nccli.errors import UsageError
from nccli.extract import api
from nccli.io.names import epoch_step_from_name, epoch_step_from_path, strip_epoch_step

ARCH = "mlp:in_dim=6,widths=10-,num_classes=3,head_depth=1"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_cluster_npz(tmp_path / "data.npz", 30, 6, 3, seed=0)


def _extract(ckpts: list[Path], data: Path, out: Path) -> None:
    res = runner.invoke(
        app, ["extract", *map(str, ckpts), "--data", str(data), "--arch", ARCH, "-o", str(out)]
    )
    assert res.exit_code == 0, res.output


def _compare(*args: str) -> tuple[pd.DataFrame, str]:
    res = runner.invoke(app, ["compare", *args, "--format", "csv", "--metrics", "nc1"])
    assert res.exit_code == 0, res.output
    return pd.read_csv(io.StringIO(res.stdout)), res.stderr


def _table(*args: str) -> str:
    res = runner.invoke(app, ["compare", *args, "--format", "table", "--metrics", "nc1"])
    assert res.exit_code == 0, res.output
    return res.stdout


def _epochs(df: pd.DataFrame, layer: str = "classifier") -> list[int]:
    return [int(e) for e in df[df["layer"] == layer]["epoch"]]


def test_names_grammar():
    assert epoch_step_from_name("ckpt_5.pth") == (5, None)
    assert epoch_step_from_name("ckpt5") == (5, None)
    assert epoch_step_from_name("model_e5.pt") == (5, None)
    assert epoch_step_from_name("checkpoint-500") == (None, 500)
    assert epoch_step_from_name("step1000.pt") == (None, 1000)
    assert epoch_step_from_name("epoch=5-step=100.ckpt") == (5, 100)
    assert epoch_step_from_name("ckpt.pth") == (None, None)
    assert epoch_step_from_name("ckpt_best.pth") == (None, None)
    assert epoch_step_from_name("model.ckpt-1000") == (None, None)  # TensorFlow: not an epoch
    assert epoch_step_from_path("run/ep3/ckpt.pth") == (3, None)
    assert epoch_step_from_path("checkpoint-500/pytorch_model.bin") == (None, 500)
    assert epoch_step_from_path("ep3/ckpt_7.pth") == (7, None)  # the file's own name wins
    assert strip_epoch_step("run1_ckpt_5") == "run1"


def test_cache_names_from_the_folder_when_it_tells_them_apart(tmp_path):
    out = tmp_path / "out"
    same = [Path("ep0/ckpt.pth"), Path("ep1/ckpt.pth")]
    assert [api.cache_path(out, p, same) for p in same] == [
        out / "ep0_ckpt.h5",
        out / "ep1_ckpt.h5",
    ]
    # the folder carries the epoch, the file does not: the same name whether extracted
    # alone or with its siblings (one at a time into one -o must not collide)
    assert api.cache_path(out, Path("ep0/ckpt.pth")) == out / "ep0_ckpt.h5"
    assert api.cache_path(out, Path("ep0/ckpt.pth"), [Path("ep0/other.pth")]) == (
        out / "ep0_ckpt.h5"
    )
    # neither says anything, or the file does: the file's own name
    assert api.cache_path(out, Path("best/ckpt.pth")) == out / "ckpt.h5"
    assert api.cache_path(out, Path("ep0/model_ep3.pth")) == out / "model_ep3.h5"
    hf = Path("checkpoint-500/pytorch_model.bin")
    assert api.cache_path(out, hf) == out / "checkpoint-500_pytorch_model.h5"
    assert api.cache_path(out, Path("run/checkpoint-9/model.safetensors")) == (
        out / "checkpoint-9_model.h5"
    )
    # same file and folder names: still refused, with a way out
    with pytest.raises(UsageError, match="different -o"):
        api._check_options(
            ["a/ep0/ckpt.pth", "b/ep0/ckpt.pth"], "off", 8, "float32", None, 0, ARCH, None
        )


def test_ckpt_1_to_20_without_epoch_keys(tmp_path, data):
    ckpts = [save_state_dict(tmp_path / f"ckpt_{i}.pth", ARCH, seed=i) for i in range(1, 21)]
    out = tmp_path / "out"
    _extract(ckpts, data, out)
    df, err = _compare(*[str(out / f"ckpt_{i}.h5") for i in range(1, 21)])
    assert _epochs(df) == list(range(1, 21))
    assert "note: ordered 20 checkpoints by the epoch in their file names" in err
    shuffled = [str(out / f"ckpt_{i}.h5") for i in range(1, 21)]
    random.Random(0).shuffle(shuffled)
    assert _epochs(_compare(*shuffled)[0]) == list(range(1, 21))
    assert _epochs(_compare(str(out))[0]) == list(range(1, 21))  # a directory too


def test_model_e5_and_ckpt5(tmp_path, data):
    ckpts = [save_state_dict(tmp_path / f"model_e{e}.pt", ARCH, seed=e) for e in (10, 5, 20)]
    _extract(ckpts, data, tmp_path / "out")
    df, err = _compare(str(tmp_path / "out"))
    assert _epochs(df) == [5, 10, 20]
    assert "note: ordered 3 checkpoints by the epoch in their file names" in err
    ckpts = [save_state_dict(tmp_path / f"ckpt{e}.pt", ARCH, seed=e) for e in (12, 3)]
    _extract(ckpts, data, tmp_path / "out2")
    df, err = _compare(str(tmp_path / "out2"))
    assert _epochs(df) == [3, 12]
    assert "note: ordered 2 checkpoints by the epoch in their file names" in err


def test_hugging_face_checkpoint_folders(tmp_path, data):
    ckpts = []
    for step in (1000, 500, 1500):
        (tmp_path / f"checkpoint-{step}").mkdir()
        ckpts.append(save_state_dict(tmp_path / f"checkpoint-{step}/pytorch_model.bin", ARCH))
    out = tmp_path / "out"
    _extract(ckpts, data, out)
    assert sorted(p.name for p in out.glob("*.h5")) == [
        "checkpoint-1000_pytorch_model.h5",
        "checkpoint-1500_pytorch_model.h5",
        "checkpoint-500_pytorch_model.h5",
    ]
    df, err = _compare(str(out))
    steps = [int(s) for s in df[df["layer"] == "classifier"]["step"]]
    assert steps == [500, 1000, 1500]
    assert "note: ordered 3 checkpoints by the step in their file names" in err


def test_same_file_name_in_epoch_folders(tmp_path, data):
    ckpts = []
    for e in (2, 0, 1, 10):
        (tmp_path / f"ep{e}").mkdir()
        ckpts.append(save_state_dict(tmp_path / f"ep{e}/ckpt.pth", ARCH, seed=e))
    out = tmp_path / "out"
    _extract(ckpts, data, out)  # one -o: no refusal
    names = sorted(p.name for p in out.glob("*.h5"))
    assert names == ["ep0_ckpt.h5", "ep10_ckpt.h5", "ep1_ckpt.h5", "ep2_ckpt.h5"]
    df, err = _compare(str(out))
    assert _epochs(df) == [0, 1, 2, 10]
    assert "note: ordered 4 checkpoints by the epoch in their file names" in err
    table = _table(str(out))
    for e in (0, 1, 2, 10):
        assert f"ep{e}_ckpt.h5" in table
    rows = [ln for ln in table.splitlines() if "_ckpt.h5" in ln]
    assert len(rows) == 2 * 4  # two layers, every checkpoint in each
    nc1 = df[df["layer"] == "classifier"]["value"].tolist()
    cls_rows = rows[4:] if "head.0" in table.split("classifier")[0] else rows[:4]
    for row, v in zip(cls_rows, nc1, strict=True):
        assert f"{v:.4f}" in row


def test_separate_out_dirs_each_row_in_the_table(tmp_path, data):
    """The old workaround (one -o per checkpoint): same-named caches, one run; the table
    used to show one row labelled with the first epoch and the last one's values."""
    caches = []
    for e in (0, 1, 2):
        (tmp_path / f"ep{e}").mkdir()
        ckpt = save_state_dict(tmp_path / f"ep{e}/ckpt.pth", ARCH, seed=e)
        _extract([ckpt], data, tmp_path / f"o{e}")
        # as older nccli named them: the same file name in every folder
        (tmp_path / f"o{e}/ep{e}_ckpt.h5").rename(tmp_path / f"o{e}/ckpt.h5")
        caches.append(str(tmp_path / f"o{e}/ckpt.h5"))
    df, _ = _compare(*caches, "--run-from", "stem")
    assert _epochs(df) == [0, 1, 2]
    table = _table(*caches, "--run-from", "stem")
    rows = [ln for ln in table.splitlines() if "ckpt.h5" in ln]
    assert len(rows) == 2 * 3
    for row, v in zip(rows[3:], df[df["layer"] == "classifier"]["value"], strict=True):
        assert f"{v:.4f}" in row


def test_natural_sort_then_order_given(tmp_path, data):
    ckpts = [save_state_dict(tmp_path / f"snap{i}.pth", ARCH, seed=i) for i in (1, 2, 10)]
    ckpts += [save_state_dict(tmp_path / f"{n}.pth", ARCH) for n in ("last", "best")]
    out = tmp_path / "out"
    _extract(ckpts, data, out)
    df, err = _compare(*(str(out / f"snap{i}.h5") for i in (10, 1, 2)))
    assert df[df["layer"] == "classifier"]["source"].tolist() == [
        "snap1.h5",
        "snap2.h5",
        "snap10.h5",
    ]
    assert "note: ordered 3 checkpoints by natural sort of their paths" in err
    df, err = _compare(str(out / "last.h5"), str(out / "best.h5"))
    assert df[df["layer"] == "classifier"]["source"].tolist() == ["last.h5", "best.h5"]
    assert "note: ordered 2 checkpoints in the order given" in err


def test_ckpt_number_that_the_file_stores_as_its_step(tmp_path, data):
    """``ckpt_0300.pt`` holding ``{'model': sd, 'step': 300}`` (a step-based training loop):
    the name's number is that step, not also an epoch (the table said "epoch 300")."""
    import torch
    from helpers import seeded_model

    from nccli.io.names import fill_from_name

    assert fill_from_name(None, 300, 300, None) == (None, 300)
    assert fill_from_name(None, 300, 3, None) == (3, 300)  # ep3 saved at step 300
    assert fill_from_name(None, None, 300, None) == (300, None)
    assert fill_from_name(7, None, 300, None) == (7, None)
    ckpts = []
    for s in (200, 100, 300):
        ckpts.append(tmp_path / f"ckpt_{s:04d}.pt")
        torch.save({"model": seeded_model(ARCH, s).state_dict(), "step": s}, ckpts[-1])
    _extract(ckpts, data, tmp_path / "out")
    df, err = _compare(str(tmp_path / "out"))
    rows = df[df["layer"] == "classifier"]
    assert rows["epoch"].isna().all() and list(rows["step"]) == [100, 200, 300]
    assert "note: ordered 3 checkpoints by the step recorded in them" in err
