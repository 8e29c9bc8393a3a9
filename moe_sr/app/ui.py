"""The Gradio page: components, layout and wiring to :class:`~moe_sr.app.controller.AppController`.

Everything the page does is a controller method; this module only turns the controller's view
dicts into component updates. Element ids (``#run``, ``#status``, ...) are stable: the browser
test finds the page's parts by them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from moe_sr.app.controller import AppController
from moe_sr.app.options import (
    MAX_SEED,
    SAMPLERS,
    TILE_MODES,
    RunSettings,
    precisions_for,
)
from moe_sr.color_fix import COLOR_FIX_MODES
from moe_sr.pipeline import ROUTING_MODES

#: Fonts the browser has: the default theme's Google fonts cannot load on an offline machine.
_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO = ["ui-monospace", "monospace"]
CSS = """
#status { min-height: 2.5em; }
#command textarea, #command .cm-content { font-size: 0.85em; }
"""


@dataclass(frozen=True)
class PageInfo:
    """What the page says about the server: the model, the limits."""

    title: str
    model: str
    limits: str


def theme() -> gr.themes.Base:
    return gr.themes.Default(font=_FONTS, font_mono=_MONO)


def build_page(
    controller: AppController, defaults: RunSettings, info: PageInfo, *, max_steps: int
) -> gr.Blocks:
    """The page. Serve it with ``.queue(...).launch(...)`` (see :mod:`moe_sr.cli.app`)."""
    devices = controller.devices
    with gr.Blocks(title=info.title) as page:
        gr.Markdown(f"# {info.title}\n{info.model}")
        results = gr.State([])
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                files = gr.File(
                    label="LR images (drop or click; several at once)",
                    file_count="multiple",
                    elem_id="lr-files",
                )
                pasted = gr.Image(
                    label="…or paste one (Ctrl+V in this box)",
                    sources=["clipboard"],
                    type="filepath",
                    image_mode=None,
                    format="png",
                    height=160,
                    elem_id="lr-paste",
                )
                with gr.Row():
                    steps = gr.Slider(
                        1, max_steps, value=defaults.steps, step=1, label="sampling steps",
                        elem_id="steps",
                    )  # fmt: skip
                    sampler = gr.Dropdown(
                        list(SAMPLERS), value=defaults.sampler, label="sampler",
                        interactive=len(SAMPLERS) > 1, elem_id="sampler",
                    )  # fmt: skip
                with gr.Row(equal_height=True):
                    seed = gr.Number(
                        value=defaults.seed, precision=0, minimum=0, maximum=MAX_SEED,
                        label="seed", elem_id="seed", scale=3,
                    )  # fmt: skip
                    reseed = gr.Button("random seed", elem_id="random-seed", scale=1)
                color_fix = gr.Radio(
                    list(COLOR_FIX_MODES), value=defaults.color_fix, label="colour fix",
                    elem_id="color-fix",
                )  # fmt: skip
                tile = gr.Radio(
                    list(TILE_MODES), value=defaults.tile, label="tiling (auto: above the tile size)",
                    elem_id="tile",
                )  # fmt: skip
                routing = gr.Radio(
                    list(ROUTING_MODES), value=defaults.ffn_moe_routing,
                    label="FFN-MoE routing (random: as released; average: deterministic)",
                    elem_id="routing",
                )  # fmt: skip
                with gr.Accordion("more", open=False):
                    eta = gr.Slider(0.0, 1.0, value=defaults.eta, step=0.05, label="DDIM eta (ddim only)",
                                    elem_id="eta")  # fmt: skip
                    device = gr.Dropdown(
                        devices, value=defaults.device, label="device",
                        visible=len(devices) > 1, elem_id="device",
                    )  # fmt: skip
                    precision = gr.Dropdown(
                        precisions_for(defaults.device), value=defaults.precision,
                        label="UNet precision", elem_id="precision",
                    )  # fmt: skip
                    gr.Markdown(info.limits)
                with gr.Row():
                    run = gr.Button("Run 8x SR", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown("Ready.", elem_id="status")
            with gr.Column(scale=3, min_width=420):
                slider = gr.ImageSlider(
                    label="bicubic | SR (drag the handle to compare)", format="png",
                    type="filepath", max_height=640, elem_id="slider",
                )  # fmt: skip
                compare = gr.Gallery(
                    label="LR (nearest) · bicubic · SR: click to zoom", columns=3,
                    format="png", object_fit="contain", height=300, elem_id="compare",
                )  # fmt: skip
                with gr.Row():
                    download = gr.DownloadButton(
                        "Download SR (PNG)", value=None, elem_id="download", interactive=False
                    )
                details = gr.Markdown(elem_id="details")
                command = gr.Code(
                    label="the same with the command line", language="shell", lines=2,
                    interactive=False, wrap_lines=True, show_line_numbers=False,
                    elem_id="command",
                )  # fmt: skip
                gallery = gr.Gallery(
                    label="all results of the run (click one to compare it)", columns=6,
                    height=180, allow_preview=False, visible=False, elem_id="results",
                )  # fmt: skip
                downloads = gr.File(label="all SR PNGs", file_count="multiple",
                                    interactive=False, elem_id="downloads")  # fmt: skip

        views = {
            "status": status, "slider": slider, "compare": compare, "gallery": gallery,
            "download": download, "downloads": downloads, "details": details,
            "command": command, "results": results,
        }  # fmt: skip
        outputs = list(views.values())

        def to_updates(view: dict) -> dict:
            out = {}
            for key, value in view.items():
                if key == "download":
                    out[download] = gr.DownloadButton(value=value, interactive=value is not None)
                elif key == "gallery":
                    out[gallery] = gr.Gallery(value=value, visible=len(value) > 1)
                elif key in views:
                    out[views[key]] = value
            return out

        def on_submit(request: gr.Request) -> None:
            controller.submit(request.session_hash)

        def on_run(files, pasted, steps, sampler, seed, eta, color_fix, tile, routing,
                   device, precision, request: gr.Request, progress=gr.Progress()):  # fmt: skip
            form = {
                "steps": steps, "sampler": sampler, "seed": seed, "eta": eta,
                "color_fix": color_fix, "tile": tile, "ffn_moe_routing": routing,
                "device": device, "precision": precision,
            }  # fmt: skip
            for view in controller.run(request.session_hash, files, pasted, form):
                if "progress" in view:
                    bar = view.pop("progress")
                    if bar is not None:
                        progress((bar[0], bar[1]), desc=bar[2], unit="steps")
                yield to_updates(view)

        def on_cancel(request: gr.Request) -> str:
            return controller.cancel(request.session_hash)["status"]

        def on_select(res, evt: gr.SelectData):
            return to_updates(controller.show(res, evt.index))

        def on_device(dev: str):
            choices = precisions_for(dev)
            return gr.Dropdown(choices=choices, value="fp32" if "fp32" in choices else choices[0])

        inputs = [files, pasted, steps, sampler, seed, eta, color_fix, tile, routing, device,
                  precision]  # fmt: skip
        run.click(on_submit, None, None, queue=False).then(
            on_run, inputs, outputs, concurrency_id="sr", show_progress="minimal"
        )
        cancel.click(on_cancel, None, status, queue=False)
        reseed.click(lambda: AppController.random_seed(), None, seed, queue=False)
        gallery.select(on_select, results, outputs, queue=False)
        device.change(on_device, device, precision, queue=False)
    return page
