"""Decode and prefill of a build against llama.cpp on the same checkpoint, same machine, runs alternated.

llama.cpp is the CPU peer edge users pick (issue 17). This converts the checkpoint's language model to GGUF with
llama.cpp's own converter, quantizes it with llama.cpp, and times llama.cpp (through llama-cpp-python) and the
exported build (mmexport's runtime) in one process, alternating single requests:

- llama.cpp: the prompt's token count of random text tokens evaluated in one batch (prefill), then greedy decoding;
- mmexport: `Pipeline.generate` on the image and prompt of `mmexport bench` (the same prompt length), EOS ignored.

Both get the same threads (`--threads`, default 2). Decode is tokens after the first over the decode time, as in
`mmexport bench`; prefill is the decoder's prefill only (the vision tower is ours alone: llama.cpp's runs in its
mmproj, not converted here). Medians of `--rounds`.

    pip install llama-cpp-python gguf           # builds llama.cpp for this CPU (minutes)
    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/l && tar xzf /tmp/l/*.tar.gz -C /tmp/l
    python scripts/llamacpp_compare.py CHECKPOINT_DIR ARTIFACT_DIR --llama-src /tmp/l/llama_cpp_python-*/vendor/llama.cpp \
        --ftype q4_0 [--rounds 5] [--threads 2] [--work /tmp/gguf]

CHECKPOINT_DIR is the Hugging Face directory the build was exported from (for a synthetic recipe, the one
`mmexport build` prints under the cache). The converter needs torch and transformers (the export extra).
For a tokenizer llama.cpp's converter does not know (this repo's synthetic ones), the pre-tokenizer is declared
"qwen2": the timing does not depend on it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import runpy
import statistics
import sys
import time
from pathlib import Path

FTYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_* values


def convert(checkpoint: Path, llama_src: Path, out: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py on the checkpoint, f32 (the text model only)."""
    sys.path[:0] = [str(llama_src / "gguf-py"), str(llama_src)]
    import conversion.base as base

    for obj in vars(base).values():
        if isinstance(obj, type) and hasattr(obj, "get_vocab_base_pre"):
            obj.get_vocab_base_pre = lambda self, tok: "qwen2"
    try:
        import conversion.qwenvl as qv

        qv.Qwen2VLModel.set_vocab = lambda self: self._set_vocab_gpt2()  # no sentencepiece model in a BPE checkpoint
    except ImportError:
        pass
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outfile", str(out), "--outtype", "f32"]
    try:
        runpy.run_path(str(llama_src / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = FTYPES[ftype], threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--llama-src", type=Path, required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--ftype", choices=sorted(FTYPES), default="q4_0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("gguf-work"), help="where the GGUF files go")
    a = ap.parse_args()

    os.environ["MMEXPORT_THREADS"] = str(a.threads)
    import numpy as np
    from llama_cpp import Llama

    from mmexport.bench import DEFAULT_PROMPT, default_image
    from mmexport.bench.results import describe_quantization
    from mmexport.runtime.pipeline import Pipeline

    a.work.mkdir(parents=True, exist_ok=True)
    f32 = a.work / "model-f32.gguf"
    if not f32.exists():
        convert(a.checkpoint, a.llama_src, f32)
    model = f32 if a.ftype == "f32" else a.work / f"model-{a.ftype}.gguf"
    if not model.exists():
        quantize(f32, model, a.ftype, a.threads)

    pipe = Pipeline(a.artifacts)
    images = [default_image()]
    n_prompt = len(pipe.prepare(DEFAULT_PROMPT, images).input_ids)
    llm = Llama(model_path=str(model), n_ctx=max(1024, n_prompt + a.new_tokens), n_threads=a.threads,
                n_threads_batch=a.threads, n_batch=max(512, n_prompt), verbose=False)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, min(llm.n_vocab(), 800), n_prompt)]

    def llama_run() -> dict[str, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(a.new_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return {"prefill_ms": (t1 - t0) * 1e3, "tok_s": (a.new_tokens - 1) / (time.perf_counter() - t1)}

    def ours_run() -> dict[str, float]:
        r = pipe.generate(DEFAULT_PROMPT, images, max_new_tokens=a.new_tokens, ignore_eos=True)
        return {"prefill_ms": r.timings_ms["prefill"], "tok_s": r.tokens_per_s}

    quant = describe_quantization(pipe.manifest.data.get("quantization"))
    ours = f"mmexport {quant or pipe.manifest.data.get('precision')}"
    sides = {f"llama.cpp {a.ftype}": llama_run, ours: ours_run}
    for f in sides.values():  # warm-up
        f()
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for i in range(a.rounds):
        for name, f in sides.items():
            time.sleep(0.5)  # the previous side's spinning threads settle
            runs[name].append(f())
            print(f"{name} run {i + 1}: decode {runs[name][-1]['tok_s']:.1f} tok/s, prefill {runs[name][-1]['prefill_ms']:.0f} ms",
                  file=sys.stderr)
    print(f"{n_prompt} prompt tokens, {a.new_tokens} new tokens, {a.threads} threads, medians of {a.rounds} alternated runs")
    for name, rs in runs.items():
        print(f"{name:44s} decode {statistics.median(r['tok_s'] for r in rs):6.1f} tok/s   "
              f"prefill {statistics.median(r['prefill_ms'] for r in rs):7.0f} ms")


if __name__ == "__main__":
    main()
