"""Triton Inference Server Python-backend model that serves an mmexport build (written by `mmexport triton`
as MODEL/1/model.py; the build sits beside it, or where the `artifact_dir` parameter says).

Written with --no-decoupled, each request gets one response (the `infer` endpoints of KServe v2 HTTP and
gRPC clients, which refuse decoupled models); the requests of one `execute` call decode together.

Needs, in the Python that Triton's Python backend runs (inside NVIDIA's container: `pip install mmexport`,
no torch): numpy and mmexport. Decoupled: each request gets its answer as a stream of responses unless its
`stream` input is false (one per generated token: `text_output` holds the new text, `token_ids` the token),
else as one response with the whole text and every token. All requests of an instance share one
continuous-batching engine (mmexport/serve/engine.py): up to `max_batch` of them decode together.

Inputs (the names Triton's LLM tooling uses): text_input (BYTES, the user's text, rendered with the chat
template as `mmexport run --prompt` does), image_bytes_input (BYTES, encoded image files, one per image),
max_tokens (INT32), temperature / top_p (FP32), seed (UINT64), stream (BOOL); all but text_input optional.
"""
import io
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(cfg, key, default=None):
    v = cfg.get("parameters", {}).get(key, {}).get("string_value")
    return default if v in (None, "") else v


def _scalar(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    arr = t.as_numpy().reshape(-1)
    return default if arr.size == 0 else arr[0].item()


def _strings(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [x if isinstance(x, bytes) else str(x).encode() for x in t.as_numpy().reshape(-1)]


def _response(text, token_ids):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("token_ids", np.asarray(token_ids, dtype=np.int32)),
    ])


def _error(e):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))


class TritonPythonModel:
    def initialize(self, args):
        from mmexport.runtime.pipeline import Pipeline
        from mmexport.serve.engine import Engine

        cfg = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        art = _param(cfg, "artifact_dir", "artifact")
        if not os.path.isabs(art):
            art = os.path.join(args["model_repository"], args["model_version"], art)
        runner_kw = {}
        if args.get("model_instance_kind") == "GPU" and _param(cfg, "backend", "ort") == "trt":
            runner_kw["device"] = int(args.get("model_instance_device_id", 0))
        self.pipe = Pipeline(art, backend=_param(cfg, "backend", "ort"), **runner_kw)
        self.max_tokens = int(self.pipe.manifest.limits["max_new_tokens"])
        slots = int(_param(cfg, "max_batch", self.pipe.manifest.limits.get("max_batch", 1)))
        self.engine = Engine(self.pipe, slots, max_queue=int(_param(cfg, "max_queue", 256))).start()
        self.drain_s = float(_param(cfg, "shutdown_timeout", 30))

    def execute(self, requests):
        if not self.decoupled:
            return self._execute_sync(requests)
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender.send)
            except Exception as e:  # a bad request: one error response, the model keeps serving
                sender.send(_error(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _execute_sync(self, requests):
        """Not decoupled (`mmexport triton --no-decoupled`, for KServe v2 HTTP/gRPC `infer` clients): the
        call's requests decode together and each gets one response with its whole answer."""
        import threading

        out = [None] * len(requests)
        done = [threading.Event() for _ in requests]
        for i, request in enumerate(requests):
            def send(response=None, flags=0, i=i):
                if flags & pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                    out[i] = response
                    done[i].set()

            try:
                self._submit(request, send, allow_stream=False)
            except Exception as e:
                send(_error(e), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        for d in done:
            d.wait()
        return out

    def _submit(self, request, send, allow_stream=True):
        from PIL import Image

        from mmexport.runtime.sampling import SamplingParams
        from mmexport.serve.engine import GenRequest

        texts = _strings(request, "text_input")
        if len(texts) != 1:
            raise ValueError("text_input must hold exactly one string")
        images = []
        for i, data in enumerate(_strings(request, "image_bytes_input")):
            try:
                im = Image.open(io.BytesIO(data))
                im.load()
            except Exception as e:
                raise ValueError(f"image_bytes_input[{i}] is not a decodable image: {e}") from None
            images.append(im)
        max_tokens = int(_scalar(request, "max_tokens", self.max_tokens))
        if not 1 <= max_tokens <= self.max_tokens:
            raise ValueError(f"max_tokens must be 1..{self.max_tokens}, got {max_tokens}")
        seed = _scalar(request, "seed", None)
        sampling = SamplingParams(temperature=float(_scalar(request, "temperature", 0.0)),
                                  top_p=float(_scalar(request, "top_p", 1.0)), seed=None if seed is None else int(seed))
        # a decoupled model streams unless told not to (`generate_stream` with text_input and max_tokens
        # streams; Triton's one-response `generate` endpoint then needs "stream": false)
        stream = bool(_scalar(request, "stream", self.decoupled))
        if stream and not allow_stream:
            raise ValueError("stream=true needs the decoupled model (written without --no-decoupled)")
        prep = self.pipe.prepare(texts[0].decode("utf-8"), images)
        text, ids = [], []
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def on_event(ev):
            if ev.kind == "text":
                if ev.token_id is not None:
                    ids.append(ev.token_id)
                text.append(ev.text)
                if stream:
                    send(_response(ev.text, [] if ev.token_id is None else [ev.token_id]))
            elif ev.kind == "error":
                send(_error(ev.message), flags=final)
            elif stream:
                send(flags=final)
            else:
                send(_response("".join(text), ids), flags=final)

        self.engine.submit(GenRequest(prep, max_tokens, sampling, on_event=on_event))

    def finalize(self):
        self.engine.drain(self.drain_s)
        self.engine.stop()
        self.pipe.close()
