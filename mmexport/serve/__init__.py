"""Serving a build: an OpenAI-compatible HTTP server with continuous batching (`mmexport serve`), and a
Triton Inference Server model repository (`mmexport triton`). Torch-free, like the runtime.

  engine.py      continuous batching over runtime/batch.py's slots (one engine thread)
  openai_api.py  OpenAI's request/response/error format, image sources and limits
  app.py         FastAPI app + uvicorn (`mmexport serve`)
  metrics.py     Prometheus metrics
  triton.py      the model repository writer (`mmexport triton`); triton_model.py is its model.py
"""
