"""`sftflow board`: a web workbench over the saves dir (needs the `board` extra: gradio).

runs.py reads runs from their output dirs and starts/stops/resumes `sftflow train` as detached processes;
form.py is the config form generated from the config dataclasses; app.py is the gradio page. The page is
only a viewer: every run lives in its own process and its output dir, so closing the page or restarting
the board changes nothing about a run.
"""
