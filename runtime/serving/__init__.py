"""Serving bundles at scale: `osx serve` on Ray Serve (app.py, jobs.py, index.html) and Triton model
repositories (`osx bundle triton`, triton.py). Needs the `serve` extra; the runtime never imports it."""
