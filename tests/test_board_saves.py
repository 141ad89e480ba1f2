"""The board writes only inside --saves: output_dir and export_dir are resolved (`..`, symlinks) before
the check, so `<saves>/../x` and a symlink under saves pointing out are refused (#28 finding 7)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from sftflow.board import runs
from sftflow.errors import SftflowError

BASE = {"model_name_or_path": "m", "dataset": "toy", "do_train": True}


def test_output_dir_dotdot_and_symlink_are_refused(tmp_path):
    saves = tmp_path / "saves"
    saves.mkdir()
    (tmp_path / "outside").mkdir()
    (saves / "link").symlink_to(tmp_path / "outside")
    for given in (
        f"{saves}/../x",
        str(saves / "link" / "run"),
        str(saves / "link"),
        f"{saves}/a/../..",
        str(saves),
    ):
        with pytest.raises(SftflowError, match="not inside the board's saves dir"):
            runs.start_run(saves, {**BASE, "output_dir": given})
    with pytest.raises(SftflowError, match="not inside the board's saves dir"):
        runs.start_run(saves, {**BASE, "output_dir": "../x"}, cwd=saves)  # relative to the board's cwd
    assert not (tmp_path / "x").exists() and not any((tmp_path / "outside").iterdir())
    inside = runs.inside_saves(saves, f"{saves}/sub/../run", "output_dir")
    assert inside == (saves / "run").resolve()


def test_saves_itself_behind_a_symlink_is_fine(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "saves").symlink_to(tmp_path / "real")
    assert (
        runs.inside_saves(tmp_path / "saves", tmp_path / "saves" / "r", "output_dir")
        == tmp_path / "real" / "r"
    )


def export_handler(demo):
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__name__", "") == "on_export":
            return block_fn.fn
    raise AssertionError("no on_export in the board")


def test_board_export_dir_is_refused_outside_saves(tmp_path, tiny_model_dir):
    pytest.importorskip("gradio")
    from sftflow.board.app import build_app

    saves = tmp_path / "saves"
    run = saves / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / runs.CONFIG_FILE).write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "template": "default"}))  # fmt: skip
    (tmp_path / "outside").mkdir()
    (saves / "exports").mkdir()
    (saves / "exports" / "link").symlink_to(tmp_path / "outside")
    on_export = export_handler(build_app(saves, {}))
    for target in (f"{saves}/../out", str(saves / "exports" / "link"), str(saves / "exports" / "link" / "m")):
        shown = list(on_export("run", target, "hf", "f16", False))
        assert len(shown) == 1 and "is not inside the board" in shown[0], shown
    assert not (tmp_path / "out").exists() and not any((tmp_path / "outside").iterdir())
