"""The lab's web app: one ``gr.Blocks`` page with one tab per method.

Each tab is a module ``editing/lab/tab_<name>.py`` with ``TITLE`` (the tab's label) and ``build(lab)``, which lays
out its components inside ``with gr.Tab(TITLE):``. The tabs are listed in ``TABS`` in the order they appear; one
whose module is not there (a tab still being written) is skipped with a log line, so the app runs with the tabs
it has.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import gradio as gr

from .context import LabContext
from .ui import CSS, GRADIO_6

log = logging.getLogger(__name__)

TABS = ["tab_generate", "tab_p2p", "tab_real_image", "tab_ip2p", "tab_controlnet", "tab_style", "tab_visii"]

INTRO = """# editlab lab
Every tab runs an `editlab` command on **{model}** and shows it under the result: that line, run in a shell in a
folder holding the uploads, writes the same PNG, byte for byte. Every PNG carries the parameters that made it.
Runs go one at a time; **Stop** ends the one in progress."""


def tab_modules() -> list[ModuleType]:
    """The tab modules of ``TABS`` that exist, in order; a missing one is logged and skipped."""
    modules = []
    for name in TABS:
        qualified = f"{__package__}.{name}"
        try:
            modules.append(importlib.import_module(qualified))
        except ModuleNotFoundError as err:
            if err.name != qualified:  # the tab exists but something it imports does not: a real error
                raise
            log.info("editlab lab: no %s.py yet; its tab is skipped", name)
    return modules


def build_app(lab: LabContext) -> gr.Blocks:
    """The whole page: a short introduction, then one tab per module."""
    model = lab.weights.name if lab.weights is not None else "the bundled toy model"
    style = {} if GRADIO_6 else {"css": CSS}  # Gradio 6 takes the CSS at launch
    with gr.Blocks(title="editlab lab", analytics_enabled=False, **style) as app:  # nothing leaves this machine
        gr.Markdown(INTRO.format(model=model))
        for module in tab_modules():
            with gr.Tab(module.TITLE):
                module.build(lab)
    return app


def serve(lab: LabContext, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Start the server (the queue runs one command at a time; files are served only from ``lab.folder``)."""
    app = build_app(lab)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, allowed_paths=[str(lab.folder)], prevent_thread_lock=not block,
               show_error=True, quiet=False, **({"css": CSS} if GRADIO_6 else {}))
    return app
