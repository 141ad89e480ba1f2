"""The board's gradio page: Train (form, YAML, command, plan, start/stop/resume, live charts), Runs (table,
overlaid curves, report.html), Chat (tuned vs base, side by side, streamed) and Export.

The page holds no run state: every panel is read again from the saves dir (runs.py) on load and on a
timer, so a reload or a new browser shows the same runs.
"""

from __future__ import annotations

import html
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.board import form, runs
from sftflow.board.gate import TokenGate
from sftflow.board.models import ChatPair, tuned_keys
from sftflow.board.views import (
    TABLE_HEADERS,
    board_token,
    chart_value,
    command_markdown,
    curve_frame,
    data_page,
    fresh_output_dir,
    log_tail,
    next_output_dir,
    overlay_frame,
    progress_markdown,
    runs_table,
)
from sftflow.config.parser import args_from_dict, read_config_file
from sftflow.errors import SftflowError
from sftflow.model.export import export_model
from sftflow.tools.plan import build_plan
from sftflow.tools.plan.format import format_plan
from sftflow.tools.report import write_report

if TYPE_CHECKING:
    from types import ModuleType

    from gradio import Dropdown, Markdown, Timer


REFRESH_S = 2.0  # live charts and progress are read again from the run dir this often
CHART_HEIGHT = 220
FORM_COLUMNS = 4


# -- the page ----------------------------------------------------------------------------------------------


def load_preset(config: str | Path | None) -> dict[str, Any]:
    """The keys the form starts with: `config` when given, else examples/demo_sft.yaml in the working dir."""

    if config:
        return read_config_file(config)
    demo = Path("examples/demo_sft.yaml")
    if demo.is_file():
        return read_config_file(demo)
    return {"model_name_or_path": "smollm2-135m-instruct", "do_train": True}


@dataclass
class Board:
    """What every tab reads: the saves dir and the loaded chat models (the runs themselves are read again
    from `saves` on every event)."""

    saves: Path
    chat: ChatPair

    def names(self) -> list[str]:
        return [r.name for r in runs.list_runs(self.saves)]

    def current_run(self) -> str | None:
        all_runs = runs.list_runs(self.saves)
        pick = [r for r in all_runs if r.status == "running"] or all_runs
        return pick[0].name if pick else None


def error_md(exc: SftflowError) -> str:
    return f"**sftflow error:** {html.escape(str(exc))}"


def build_app(saves: str | Path, preset: dict[str, Any] | None = None) -> Any:
    """The gradio Blocks of the board over `saves`, the form filled with `preset`: one function per tab
    lays it out and wires its own events; this one wires the events that cross tabs."""
    import gradio as gr

    saves = Path(saves).resolve()
    saves.mkdir(parents=True, exist_ok=True)
    preset = {k: v for k, v in (preset or {}).items() if k != "overwrite_output_dir"}
    board = Board(saves, ChatPair())

    def choices_update(value: str | None = None) -> Any:
        return gr.update(choices=board.names(), value=value)

    with gr.Blocks(title="sftflow board") as demo:
        gr.Markdown(f"## sftflow board · saves: `{saves}`")
        timer = gr.Timer(REFRESH_S)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train = train_tab(gr, board, preset, timer)
            with gr.Tab("Runs", id="runs"):
                runs_view = runs_tab(gr, board)
            with gr.Tab("Chat", id="chat"):
                chat_run = chat_tab(gr, board)
            with gr.Tab("Export", id="export"):
                export_run = export_tab(gr, board)

        def on_load() -> tuple:
            all_names = board.names()
            return (
                gr.update(choices=all_names),
                gr.update(choices=all_names, value=board.current_run()),
                gr.update(choices=all_names),
                gr.update(choices=all_names),
                gr.update(choices=all_names),
                gr.update(choices=all_names),
                next_output_dir(saves, preset.get("output_dir")),
                runs_table(saves),
            )

        run_dropdowns = [train.load_from, train.live_run, runs_view.compare, runs_view.report_run, chat_run, export_run]  # fmt: skip
        demo.load(on_load, outputs=[*run_dropdowns, train.output_dir, runs_view.table])
        runs_view.refresh_btn.click(
            lambda: (runs_table(saves), *[choices_update() for _ in range(3)]),
            None,
            [runs_view.table, runs_view.compare, runs_view.report_run, chat_run],
        )
    return demo


@dataclass
class TrainTab:
    """The Train tab's components that the page wires across tabs."""

    load_from: Any
    live_run: Any
    output_dir: Any


def train_tab(gr: ModuleType, board: Board, preset: dict[str, Any], timer: Timer) -> TrainTab:
    """Check, plan, data preview and start of the config in the form; the live run panel; the form."""
    saves = board.saves
    fields = form.fields()
    with gr.Row():
        check_btn = gr.Button("Check")
        plan_btn = gr.Button("Plan")
        start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
    message = gr.Markdown(elem_id="train-message")
    command = gr.Markdown(elem_id="train-command")
    with gr.Accordion("plan: memory and time before start", open=False) as plan_section:
        plan_box = gr.Textbox(show_label=False, lines=12, max_lines=40, interactive=False)
    with gr.Accordion("data: the examples as the model sees them", open=False):
        with gr.Row():
            data_page_no = gr.Number(value=1, minimum=1, precision=0, label="page", scale=1)
            data_btn = gr.Button("Show data", scale=1, elem_id="data-btn")
        data_box = gr.HTML(elem_id="data-box")
    live_run = live_panel(gr, board, timer, message)
    gr.Markdown("### Config (every key of `sftflow train --help`)")
    with gr.Row():
        load_from = gr.Dropdown(label="load a run's config into the form", choices=[], scale=3)
        load_btn = gr.Button("Load config", scale=1)
    widgets = config_form(gr, fields, form.keys_to_form(preset))
    yaml_box = gr.Code(label="config YAML (the keys that differ from the defaults; Check fills it)", language="yaml", lines=12, interactive=True, elem_id="yaml-box")  # fmt: skip
    yaml_btn = gr.Button("YAML → form")
    output_dir = widgets[next(i for i, f in enumerate(fields) if f.key == "output_dir")]

    def on_check(*values: Any) -> tuple[str, str, str]:
        try:
            keys = form.form_to_keys(list(values))
            form.check_keys(keys)
        except SftflowError as exc:
            return error_md(exc), "", gr.update()
        return "config OK: `sftflow train` accepts it.", command_markdown(keys), form.keys_to_yaml(keys)

    def on_yaml(text: str) -> list[Any]:
        try:
            values = form.keys_to_form(form.yaml_to_keys(text))
        except SftflowError as exc:
            return [error_md(exc), *[gr.update() for _ in fields]]
        return ["form filled from the YAML.", *values]

    def on_load_config(name: str | None) -> list[Any]:
        if not name:
            return ["pick a run first.", *[gr.update() for _ in fields]]
        keys = {k: v for k, v in runs.run_config(saves / name).items() if k != "overwrite_output_dir"}
        keys["output_dir"] = fresh_output_dir(saves)
        try:
            values = form.keys_to_form(keys)
        except SftflowError as exc:
            return [error_md(exc), *[gr.update() for _ in fields]]
        return [f"form filled from {name} (with a new output_dir).", *values]

    def on_plan(*values: Any) -> tuple[str, Any]:
        try:
            args = form.check_keys(form.form_to_keys(list(values)))
            return format_plan(build_plan(args)), gr.update(open=True)
        except SftflowError as exc:
            return f"sftflow error: {exc}", gr.update(open=True)

    def on_data(page: float, *values: Any) -> str:
        try:
            args = form.check_keys(form.form_to_keys(list(values)))
            return data_page(args, int(page or 1))
        except SftflowError as exc:
            return error_md(exc)

    def on_start(*values: Any) -> tuple:
        try:
            keys = form.form_to_keys(list(values))
            run_dir = runs.start_run(saves, keys)
        except SftflowError as exc:
            return error_md(exc), gr.update(), gr.update(), gr.update()
        name = str(run_dir.relative_to(saves))
        return (
            f"started **{name}**: it runs on its own (close the page whenever you like).",
            command_markdown({**keys, "output_dir": str(run_dir)}),
            gr.update(choices=board.names(), value=name),
            fresh_output_dir(saves),
        )

    load_btn.click(on_load_config, load_from, [message, *widgets])
    check_btn.click(on_check, widgets, [message, command, yaml_box])
    yaml_btn.click(on_yaml, yaml_box, [message, *widgets])
    data_btn.click(on_data, [data_page_no, *widgets], data_box)
    plan_btn.click(on_plan, widgets, [plan_box, plan_section])
    start_btn.click(on_start, widgets, [message, command, live_run, output_dir])
    return TrainTab(load_from, live_run, output_dir)


def live_panel(gr: ModuleType, board: Board, timer: Timer, message: Markdown) -> Dropdown:
    """The live run of the Train tab: progress, charts and log read from its output dir on every tick,
    with stop and resume. Returns the run dropdown."""
    saves = board.saves
    gr.Markdown(f"### Live run (read from its output dir every {REFRESH_S:g} s)")
    with gr.Row():
        live_run = gr.Dropdown(label="run", choices=[], scale=3, elem_id="live-run")
        stop_btn = gr.Button("Stop (checkpoint, then exit)", scale=1, elem_id="stop-btn")
        resume_btn = gr.Button("Resume", scale=1, elem_id="resume-btn")
    progress = gr.Markdown(elem_id="live-progress")
    with gr.Row():
        loss_plot = line_plot(gr, "train loss", "loss-plot")
        eval_plot = line_plot(gr, "eval loss", "eval-plot")
        lr_plot = line_plot(gr, "learning rate", "lr-plot")
    with gr.Row():
        grad_plot = line_plot(gr, "grad norm", "grad-plot")
        tps_plot = line_plot(gr, "tokens/s (non-pad)", "tps-plot")
        mem_plot = line_plot(gr, "peak memory (GB)", "mem-plot")
    with gr.Accordion("log (board_train.log)", open=False):
        log_box = gr.Code(label="last lines", language=None, lines=10, interactive=False)

    def on_tick(name: str | None) -> tuple:
        empty = None
        if not name or not (saves / name).is_dir():
            return ("no run selected.", empty, empty, empty, empty, empty, empty, "")
        run = runs.read_run(saves / name, saves)
        c = runs.curves(saves / name)
        return (
            progress_markdown(run),
            chart_value(curve_frame(c, {"loss": "raw", "loss_smoothed": "smoothed"})),
            chart_value(curve_frame(c, {"eval_loss": "eval"})),
            chart_value(curve_frame(c, {"learning_rate": "lr"})),
            chart_value(curve_frame(c, {"grad_norm": "grad norm"})),
            chart_value(curve_frame(c, {"tokens_per_second": "tokens/s"})),
            chart_value(curve_frame(c, {"peak_memory_gb": "GB"})),
            log_tail(saves / name),
        )

    def on_stop(name: str | None) -> str:
        try:
            if not name:
                raise SftflowError("pick a run first.")
            runs.stop_run(saves / name)
        except SftflowError as exc:
            return error_md(exc)
        return f"SIGTERM sent to {name}: it saves a checkpoint after this step, then stops."

    def on_resume(name: str | None) -> str:
        try:
            if not name:
                raise SftflowError("pick a run first.")
            runs.resume_run(saves / name)
        except SftflowError as exc:
            return error_md(exc)
        return f"resumed {name} from its latest complete checkpoint."

    live_outputs = [progress, loss_plot, eval_plot, lr_plot, grad_plot, tps_plot, mem_plot, log_box]
    timer.tick(on_tick, live_run, live_outputs, show_progress="hidden")
    live_run.change(on_tick, live_run, live_outputs)
    stop_btn.click(on_stop, live_run, message)
    resume_btn.click(on_resume, live_run, message)
    return live_run


def config_form(gr: ModuleType, fields: list[form.FormField], values: list[Any]) -> list[Any]:
    """One widget per config key, in an accordion per group, FORM_COLUMNS to a row."""
    widgets: list[Any] = []
    groups: dict[str, list[tuple[form.FormField, Any]]] = {}
    for field_, value in zip(fields, values, strict=True):
        groups.setdefault(field_.group, []).append((field_, value))
    for group, members in groups.items():
        with gr.Accordion(group, open=group in ("Model", "Training")):
            for i in range(0, len(members), FORM_COLUMNS):
                with gr.Row(equal_height=False):
                    for field_, value in members[i : i + FORM_COLUMNS]:
                        with gr.Column(min_width=240):
                            widgets.append(widget(gr, field_, value))
                    for _ in range(FORM_COLUMNS - len(members[i : i + FORM_COLUMNS])):
                        gr.Column(min_width=240)
    return widgets


@dataclass
class RunsTab:
    """The Runs tab's components that the page wires across tabs."""

    table: Any
    refresh_btn: Any
    compare: Any
    report_run: Any


def runs_tab(gr: ModuleType, board: Board) -> RunsTab:
    """The runs table, overlaid curves of chosen runs and a run's report.html."""
    saves = board.saves
    table = gr.Dataframe(
        headers=TABLE_HEADERS,
        interactive=False,
        wrap=True,
        elem_id="runs-table",
        column_widths=["15%", "8%", "5%", "22%", "8%", "6%", "22%", "7%", "7%"],
    )
    refresh_btn = gr.Button("Refresh", elem_id="runs-refresh")
    compare = gr.Dropdown(label="overlay these runs", choices=[], multiselect=True, elem_id="compare")
    with gr.Row():
        cmp_loss = line_plot(gr, "train loss", "cmp-loss", color_title="run")
        cmp_eval = line_plot(gr, "eval loss", "cmp-eval", color_title="run")
    with gr.Row():
        report_run = gr.Dropdown(label="open a run's report.html", choices=[], scale=3, elem_id="report-run")
        report_btn = gr.Button("Open report", scale=1, elem_id="report-btn")
    report = gr.HTML(elem_id="report")

    def on_compare(selected: list[str] | None) -> tuple:
        selected = selected or []
        return tuple(chart_value(overlay_frame(saves, selected, key)) for key in ("loss", "eval_loss"))

    def on_report(name: str | None) -> str:
        if not name:
            return "pick a run first."
        path = saves / name / "report.html"
        if not path.is_file():
            try:
                path = write_report(saves / name)
            except (SftflowError, OSError) as exc:
                return f"no report for {html.escape(name)}: {html.escape(str(exc))}"
        doc = html.escape(path.read_text(encoding="utf-8"), quote=True)
        return f'<iframe srcdoc="{doc}" style="width:100%;height:720px;border:1px solid #ddd"></iframe>'

    # a LinePlot keeps the series it first drew: clear it before drawing another set of runs
    compare.change(lambda: (None, None), None, [cmp_loss, cmp_eval]).then(
        on_compare, compare, [cmp_loss, cmp_eval]
    )
    report_btn.click(on_report, report_run, report)
    return RunsTab(table, refresh_btn, compare, report_run)


def chat_tab(gr: ModuleType, board: Board) -> Any:
    """The tuned and the base model of a run answering one prompt side by side, streamed. Returns the
    run dropdown."""
    with gr.Row():
        chat_run = gr.Dropdown(label="run", choices=[], scale=3, elem_id="chat-run")
        chat_load = gr.Button("Load", scale=1, elem_id="chat-load")
    chat_status = gr.Markdown(elem_id="chat-status")
    prompt = gr.Textbox(label="prompt", lines=2, elem_id="chat-prompt")
    with gr.Row():
        max_tokens = gr.Slider(1, 1024, value=64, step=1, label="max new tokens")
        send = gr.Button("Send to both", variant="primary", elem_id="chat-send")
    with gr.Row():
        tuned_box = gr.Textbox(label="tuned", lines=8, interactive=False, elem_id="chat-tuned")
        base_box = gr.Textbox(label="base", lines=8, interactive=False, elem_id="chat-base")

    def on_chat_load(name: str | None) -> str:
        try:
            if not name:
                raise SftflowError("pick a run first.")
            return board.chat.load(board.saves / name)
        except SftflowError as exc:
            return error_md(exc)

    def on_send(text: str, limit: float):
        if not text.strip():
            yield "", ""
            return
        try:
            yield from board.chat.stream_both([{"role": "user", "content": text}], int(limit))
        except SftflowError as exc:
            yield f"sftflow error: {exc}", ""

    chat_load.click(on_chat_load, chat_run, chat_status)
    send.click(on_send, [prompt, max_tokens], [tuned_box, base_box])
    return chat_run


def export_tab(gr: ModuleType, board: Board) -> Any:
    """Export a run (HF dir or GGUF) in a thread, with its progress. Returns the run dropdown."""
    saves = board.saves
    with gr.Row():
        export_run = gr.Dropdown(label="run", choices=[], scale=3, elem_id="export-run")
        export_dir = gr.Textbox(label="export_dir", scale=3, elem_id="export-dir")
    with gr.Row():
        export_format = gr.Dropdown(label="export_format", choices=["hf", "gguf"], value="hf")
        export_quant = gr.Dropdown(label="export_quantization", choices=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"], value="f16")  # fmt: skip
        export_over = gr.Checkbox(label="overwrite a non-empty export_dir", value=False)
    export_btn = gr.Button("Export", variant="primary", elem_id="export-btn")
    export_status = gr.Markdown(elem_id="export-status")

    def on_export_run(name: str | None) -> str:
        return str(saves / "exports" / name.replace("/", "-")) if name else ""

    def on_export(name: str | None, target: str, fmt: str, quant: str, overwrite: bool):
        try:
            if not name or not target.strip():
                raise SftflowError("pick a run and an export_dir first.")
            keys = tuned_keys(saves / name)
            export_dir = runs.inside_saves(saves, target.strip(), "export_dir", example="exports/my-export")
            keys.update(export_dir=str(export_dir), export_format=fmt, export_quantization=quant)
            args = args_from_dict(keys, require_output_dir=False)
        except SftflowError as exc:
            yield error_md(exc)
            return
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["dir"] = export_model(args.model, args.data, overwrite=overwrite)
            except SftflowError as exc:
                result["error"] = exc

        thread = threading.Thread(target=work, daemon=True)
        start = time.time()
        thread.start()
        while thread.is_alive():
            yield f"exporting {name} to `{target}` ({fmt}) … {time.time() - start:.0f} s"
            thread.join(0.5)
        if "error" in result:
            yield error_md(result["error"])
        else:
            yield f"exported {name} to `{result['dir']}` in {time.time() - start:.1f} s"

    export_run.change(on_export_run, export_run, export_dir)
    export_btn.click(
        on_export, [export_run, export_dir, export_format, export_quant, export_over], export_status
    )
    return export_run


def widget(gr: ModuleType, field_: form.FormField, value: Any) -> Any:
    """The gradio component of one config key: its name, one-line doc and default."""
    label, info = field_.key, f"{field_.doc} (default: {field_.default if field_.default != '' else 'unset'})"
    elem_id = f"key-{field_.key}"
    if field_.kind == "bool":
        return gr.Checkbox(label=label, info=info, value=value, elem_id=elem_id)
    if field_.kind == "choice":
        return gr.Dropdown(
            label=label, info=info, choices=list(field_.choices), value=value, allow_custom_value=field_.custom, elem_id=elem_id
        )  # fmt: skip
    return gr.Textbox(label=label, info=info, value=value, placeholder="unset", max_lines=1, elem_id=elem_id)


def line_plot(gr: ModuleType, title: str, elem_id: str, color_title: str = "series") -> Any:
    return gr.LinePlot(
        None, x="step", y="value", color="series", title=title, color_title=color_title,
        height=CHART_HEIGHT, elem_id=elem_id, min_width=280,
    )  # fmt: skip


def serve(
    host: str, port: int, saves: str | Path, config: str | Path | None = None, block: bool = True
) -> Any:
    """Serve the board on host:port until interrupted, behind gate.TokenGate when SFTFLOW_BOARD_TOKEN is
    set; with `block` False, return the running gradio Blocks at once (close() stops it).

    Raises:
        SftflowError: a non-loopback host without a token, or an unreadable --config.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    token = board_token(host)
    import gradio as gr
    from starlette.middleware import Middleware

    demo = build_app(saves, load_preset(config))
    print(f"sftflow board: http://{host}:{port}  (saves: {Path(saves).resolve()})", flush=True)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host,
        server_port=port,
        app_kwargs={"middleware": [Middleware(TokenGate, token=token)]} if token else None,
        share=False,
        ssr_mode=False,
        footer_links=[],
        quiet=True,
        theme=gr.themes.Default(),
        show_error=True,
        prevent_thread_lock=not block,
    )
    return demo
