"""A local web page for 8x SR (``moe-sr-app``, ``make app``), on the same pipeline as ``moe-sr``.

The pieces, each usable without Gradio except the last:

* :mod:`moe_sr.app.options`: the per-run settings, their choices and validation, the size
  limits, and the equivalent ``moe-sr`` command of a result;
* :mod:`moe_sr.app.pool`: pipelines per device slot (a job owns its slot while it runs);
* :mod:`moe_sr.app.jobs`: one run over the uploaded images (checks, progress, preview,
  cancellation, results), streamed as events;
* :mod:`moe_sr.app.ui`: the Gradio page that shows those events.
"""
