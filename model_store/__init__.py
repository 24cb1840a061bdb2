"""Model bundles on disk: verify them, build random ones, pull real weights (`python -m model_store`).

It sits beside the engine and uses its bundle format (`melfusion.bundle`), presets and pipeline;
the engine never imports it.
"""
