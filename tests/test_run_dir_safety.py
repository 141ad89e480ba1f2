"""Run dirs cannot be clobbered (issue #28): export never reads what it deletes, a run dir has one writer at
a time (a lock that a SIGKILL frees), data files are read by content, and the final save is atomic.

Runs that must be alive while another writer tries the same dir are subprocesses (single-threaded); they
pause inside training (a callback waiting for a file), so nothing here depends on timing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import TOY_ROWS, fault_config, losses, make_adapter, run_in_process, write_alpaca
from sftflow.config import load_args
from sftflow.errors import SftflowError

LOCK_NAME = ".sftflow.lock"  # sftflow.config.LOCK_NAME (imported lazily: main lacks it)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# A `sftflow train` that can wait: "hold" pauses at the start of step 2 (after checkpoint-1) until the file
# `release` exists; "together" waits before the recipe's first step (start_run) until `go` exists, so two
# of them reach the output_dir at once.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    from sftflow.cli import main
    from sftflow.stages import registry, sft

    config, mode, flags = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def wait_for(name):
        while not (flags / name).exists():
            time.sleep(0.05)

    class Hold(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                (flags / "paused").write_text("")
                wait_for("release")

    if mode == "hold":
        run_stage = registry.run_stage
        registry.run_stage = lambda args, callbacks=None: run_stage(args, callbacks=[*(callbacks or []), Hold()])
    else:
        start_run = sft.start_run

        def waiting_start_run(args):
            (flags / f"ready-{sys.argv[4]}").write_text("")
            wait_for("go")
            return start_run(args)

        sft.start_run = waiting_start_run
    sys.exit(main(["train", config]))
    """
)


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"the child exited ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def start_child(root: Path, config: Path, mode: str, flags: Path, name: str = "0") -> subprocess.Popen:
    (root / "child.py").write_text(CHILD)
    flags.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(root / "child.py"), str(config), mode, str(flags), name],
        cwd=root,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---- finding 1: export never deletes what it reads ----


def test_export_refuses_an_export_dir_that_is_its_adapter_or_base(tiny_model_dir, tmp_path):

    from sftflow.cli import main as cli_main
    from sftflow.config import ModelArguments
    from sftflow.model.export import export_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)  # a copy: on a broken export the fixture's weights would go
    adapter = make_adapter(base, tmp_path / "run", seed=1, lora_rank=2)
    before = {p.name: p.stat().st_size for p in [*adapter.iterdir(), *base.iterdir()]}
    for export_dir, how in [
        (adapter, "is"),
        (base, "is"),
        (adapter / "merged", "is inside"),
        (tmp_path, "contains"),
    ]:
        args = ModelArguments(
            model_name_or_path=str(base), adapter_name_or_path=str(adapter), export_dir=str(export_dir)
        )
        with pytest.raises(SftflowError, match=f"export_dir {export_dir} {how} .*which the export reads"):
            export_model(args, overwrite=True)
    assert (adapter / "adapter_model.safetensors").is_file() and (base / "model.safetensors").is_file()
    assert {p.name: p.stat().st_size for p in [*adapter.iterdir(), *base.iterdir()]} == before

    config = tmp_path / "export.yaml"  # the CLI: one line, the adapter intact
    config.write_text(
        f"model_name_or_path: {base}\nadapter_name_or_path: {adapter}\nexport_dir: {adapter}\n"
        "overwrite_output_dir: true\n"
    )
    assert cli_main(["export", str(config)]) == 2
    assert (adapter / "adapter_model.safetensors").is_file()


def test_export_refuses_a_dir_another_process_owns(tiny_model_dir, tmp_path):
    from sftflow.config import ModelArguments
    from sftflow.model.export import export_model

    target = tmp_path / "merged"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from sftflow.config.run_lock import claim; "
            f"claim({str(target)!r}, 'sftflow train'); print('held', flush=True); time.sleep(120)",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ModelArguments(model_name_or_path=str(tiny_model_dir), export_dir=str(target))
        with pytest.raises(SftflowError, match=rf"export_dir {target} is in use by pid {holder.pid} on host"):
            export_model(args, overwrite=True)
    finally:
        holder.kill()
        holder.wait()


# ---- findings 2 and 3: one writer per run dir ----


@pytest.mark.integration
def test_overwrite_never_deletes_a_live_runs_dir(tmp_path, tiny_model_dir, toy_data_dir):
    out, flags = tmp_path / "run", tmp_path / "flags"
    config = fault_config(tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, out, max_steps=3, save_steps=1)
    child = start_child(tmp_path, config, "hold", flags)
    try:
        wait_for(flags / "paused", [child])  # checkpoint-1 is saved, step 2 waits
        assert (out / "checkpoint-1" / "trainer_state.json").is_file()
        log_before = (out / "trainer_log.jsonl").read_text()
        with pytest.raises(SftflowError) as refused:
            run_in_process(config, "overwrite_output_dir=true")
        message = str(refused.value)
        assert f"output_dir {out} is in use by pid {child.pid} on host {socket.gethostname()}" in message
        assert "(started by 'sftflow train')" in message
        assert (out / "checkpoint-1" / "trainer_state.json").is_file()
        assert (out / "trainer_log.jsonl").read_text() == log_before
    finally:
        (flags / "release").write_text("")
        stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    assert sorted(losses(out)) == [1, 2, 3]
    assert not (out / LOCK_NAME).exists()  # the finished run gave its claim back


@pytest.mark.integration
def test_two_trains_started_together_on_one_dir_one_is_refused(tmp_path, tiny_model_dir, toy_data_dir):
    out, flags = tmp_path / "run", tmp_path / "flags"
    config = fault_config(
        tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, out, max_steps=3, save_steps=10
    )
    children = [start_child(tmp_path, config, "together", flags, name) for name in ("a", "b")]
    try:
        for name in ("a", "b"):
            wait_for(flags / f"ready-{name}", children)
        (flags / "go").write_text("")
        done = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            child.kill()
    codes = sorted(child.returncode for child in children)
    assert codes == [0, 2], [err[-2000:] for _, err in done]
    refused = next(err for child, (_, err) in zip(children, done, strict=True) if child.returncode == 2)
    winner = next(child for child in children if child.returncode == 0)
    error = [line for line in refused.splitlines() if line.startswith("sftflow error:")]
    assert len(error) == 1 and "Traceback" not in refused, refused[-3000:]
    assert f"output_dir {out} is in use by pid {winner.pid} on host {socket.gethostname()}" in error[0]
    assert sorted(losses(out)) == [1, 2, 3]  # one writer: each step logged once


def hold_lock(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from sftflow.config.run_lock import claim; "
            f"claim({str(directory)!r}, 'sftflow train'); print('held', flush=True); time.sleep(120)",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_killed_owner_frees_the_dir_and_is_taken_over_with_a_log_line(tmp_path, caplog):
    from sftflow.config import run_lock

    holder = hold_lock(tmp_path / "run")
    with pytest.raises(SftflowError, match=f"is in use by pid {holder.pid} on host"):
        run_lock.claim(tmp_path / "run", "sftflow train")
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup: its lock file and record stay behind
    holder.wait()
    assert run_lock.read_owner(tmp_path / "run").pid == holder.pid
    with caplog.at_level("WARNING"):
        owner = run_lock.claim(tmp_path / "run", "sftflow train")
    try:
        assert owner.pid == os.getpid()
        assert f"taking over from pid {holder.pid}" in caplog.text
        assert run_lock.claim(tmp_path / "run", "sftflow train") == owner  # the same process: a no-op
    finally:
        run_lock.release(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_record_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    from sftflow.config import run_lock

    run = tmp_path / "run"
    run.mkdir()
    record = {"pid": 4242, "host": "node-7", "started": "2026-01-01T00:00:00", "command": "sftflow train"}
    (run / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(SftflowError) as refused:
        run_lock.claim(run, "sftflow train")
    message = str(refused.value)
    assert (
        "in use by pid 4242 on host node-7 since 2026-01-01T00:00:00 (started by 'sftflow train')" in message
    )
    assert f"delete {run / LOCK_NAME}" in message
    assert not run_lock.holds(run)


def test_without_file_locks_a_live_owner_record_still_refuses(tmp_path, monkeypatch):
    from sftflow.config import run_lock

    holder = hold_lock(tmp_path / "run")

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # a filesystem without flock

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    try:
        with pytest.raises(SftflowError, match=f"is in use by pid {holder.pid} on host"):
            run_lock.claim(tmp_path / "run", "sftflow export")
    finally:
        holder.kill()
        holder.wait()
    assert run_lock.claim(tmp_path / "run", "sftflow export").pid == os.getpid()  # its owner is gone
    run_lock.release(tmp_path / "run")


def test_ranks_of_one_job_accept_their_own_owner_and_refuse_another(tmp_path, monkeypatch):
    from sftflow.config import run_lock

    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    run_lock.claim(run, "sftflow train")  # rank 0
    try:
        run_lock.check_job_owner(run)  # rank 1 of the same job: fine
        monkeypatch.setenv("MASTER_PORT", "29501")  # a rank of another job
        with pytest.raises(SftflowError, match="is in use by pid"):
            run_lock.check_job_owner(run)
    finally:
        run_lock.release(run)
    run_lock.check_job_owner(run)  # nobody holds it


# ---- finding 4: data files are read by content ----


def test_a_rewritten_data_file_with_the_same_size_and_mtime_trains_the_new_rows(tmp_path, tiny_tokenizer):
    from sftflow.data.prepare import prepare

    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "train.json"}}))
    write_alpaca(data / "train.json", TOY_ROWS)
    stat = (data / "train.json").stat()
    args = load_args(
        None,
        [
            "model_name_or_path=x",
            "dataset=toy",
            f"dataset_dir={data}",
            "output_dir=unused",
            "cutoff_len=64",
            f"tokenized_cache_dir={tmp_path / 'cache'}",
        ],
    )

    def texts() -> list[str]:
        prepared = prepare("sft", args.data, tiny_tokenizer, seed=0)
        return [tiny_tokenizer.decode(ids) for ids in prepared.train["input_ids"]]

    assert all("Wren" in text for text in texts())
    write_alpaca(
        data / "train.json", [{**row, "output": row["output"].replace("Wren", "Finn")} for row in TOY_ROWS]
    )
    os.utime(data / "train.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (data / "train.json").stat().st_size == stat.st_size
    assert (data / "train.json").stat().st_mtime_ns == stat.st_mtime_ns
    new = texts()
    assert all("Finn" in text and "Wren" not in text for text in new), new[:2]


# ---- finding 5: the final save is atomic; write errors are one line ----


@pytest.mark.integration
def test_a_full_disk_at_the_final_save_leaves_nothing_half_written(
    tmp_path, tiny_model_dir, toy_data_dir, monkeypatch, capsys
):
    from transformers import PreTrainedTokenizerBase

    from sftflow.cli import main as cli_main

    out = tmp_path / "run"
    config = fault_config(
        tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, out, max_steps=2, save_strategy="no"
    )
    save = PreTrainedTokenizerBase.save_pretrained

    def full_disk(self, save_directory, *args, **kwargs):
        # the disk fills up halfway through tokenizer.json
        (Path(save_directory) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("sftflow error:")]
    assert len(error) == 1 and "Traceback" not in err, err[-3000:]
    assert f"of {out} failed writing" in error[0] and "no space left on device" in error[0]
    assert "bytes free" in error[0]
    names = sorted(p.name for p in out.iterdir())
    for name in ("tokenizer.json", "adapter_model.safetensors", "all_results.json", ".tmp-final"):
        assert name not in names, names

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    run_in_process(config, "overwrite_output_dir=true")  # with room, the same run finishes whole
    json.loads((out / "tokenizer.json").read_text())
    assert (out / "adapter_model.safetensors").is_file() and (out / "all_results.json").is_file()
    assert not (out / ".tmp-final").exists() and not (out / LOCK_NAME).exists()


def test_the_completion_marker_is_published_last(tmp_path, monkeypatch):
    from sftflow.train import final_save

    stage = tmp_path / "out" / final_save.STAGING_NAME
    stage.mkdir(parents=True)
    for name in ("all_results.json", "adapter_model.safetensors", "sftflow_args.yaml", "tokenizer.json"):
        (stage / name).write_text("x")
    order = []
    replace = os.replace
    monkeypatch.setattr(final_save.os, "replace", lambda a, b: (order.append(Path(b).name), replace(a, b)))
    final_save.publish(stage, tmp_path / "out", 10, last=("sftflow_args.yaml", "all_results.json"))
    assert order[-2:] == ["sftflow_args.yaml", "all_results.json"] and len(order) == 4
    assert not stage.exists()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    from sftflow.cli import main as cli_main

    out = tmp_path / "run"
    out.write_text("not a dir")
    config = fault_config(tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, out, max_steps=1)
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"sftflow error: output_dir {out} is a file, not a directory" in err and "Traceback" not in err


def test_a_missing_accelerator_config_is_named_at_config_time(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SftflowError, match=f"accelerator_config: {missing} does not exist"):
        load_args(
            None, ["model_name_or_path=x", "dataset=toy", "output_dir=o", f"accelerator_config={missing}"]
        )


def test_a_writer_refused_before_the_owner_wrote_its_record_still_names_it(tmp_path):
    """The owner takes the flock, then writes its record: a writer refused in between waits for the record
    instead of saying 'another process'."""
    from sftflow.config.run_lock import claim

    script = (
        "import fcntl, json, os, socket, time\n"
        f"fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(0.5)\n"
        "record = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now', 'command': 'test'}\n"
        "os.pwrite(fd, json.dumps(record).encode(), 0); time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SftflowError, match=f"is in use by pid {holder.pid} on host"):
            claim(tmp_path, "sftflow train")
    finally:
        holder.kill()
        holder.wait()
