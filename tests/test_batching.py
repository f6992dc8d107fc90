"""Continuous batching in the runtime (ONNX Runtime, real builds of both families):

- the decoder's batch axis is declared 1..max_batch (manifest, TensorRT profiles) and traced dynamic;
- requests decoding together in slots of one cache, admitted and released at different times (a freed
  slot reused, free rows below the highest one), get the same tokens and logits as each alone;
- Method B rows with different tile counts and a text-only row share one step (cross K/V per slot);
- the engine frees a cancelled request's slot at once.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest


def _solo(pipe, prompt, images, n):
    """Tokens and each step's logits of one request alone (the `mmexport run` path, step by step)."""
    from mmexport.runtime.pipeline import KVCache

    prep = pipe.prepare(prompt, images)
    state = pipe.encode_images(prep.images)
    cache = KVCache(pipe.specs["decoder"])
    logits = pipe.prefill(prep, state, cache)
    toks, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits)
        toks.append(int(np.argmax(logits)))
        logits = pipe.decoder_step(pipe.embed(np.asarray([toks[-1]])), pipe.family.step_feeds(prep, state, cache.length), cache)
    return toks, all_logits


@pytest.mark.parametrize("which", ["tiny_artifacts", "mllama_artifacts"])
def test_slots_decode_like_solo_requests(request, which, images):
    from mmexport.runtime.batch import SlotDecoder
    from mmexport.runtime.pipeline import Pipeline

    pipe = Pipeline(request.getfixturevalue(which))
    reqs = [("Describe the image.", [images[0]]), ("Hello there, who are you?", []), ("Compare them.", [images[1], images[2]]),
            ("What colour is it?", [images[2]]), ("Tell me a story.", [])]
    n = 12
    try:
        solo = [_solo(pipe, p, im, n) for p, im in reqs]
        dec = SlotDecoder(pipe, 4)
        got = {i: ([], []) for i in range(len(reqs))}
        slot_of, logits = {}, {}

        def admit(i):
            prep = pipe.prepare(*reqs[i])
            slot_of[i] = dec.free_slot()
            logits[i] = dec.admit(slot_of[i], prep, pipe.encode_images(prep.images))

        # three start together, a fourth joins mid-flight (its prefill between the others' steps), the
        # fifth waits for a slot to be freed; slot 0's request stops early so rows below hi are free
        for i in range(3):
            admit(i)
        step, highest = 0, 0
        while slot_of:
            tokens = {}
            for i, slot in list(slot_of.items()):
                got[i][1].append(logits[i])
                got[i][0].append(int(np.argmax(logits[i])))
                if len(got[i][0]) == (5 if i == 0 else n):
                    dec.release(slot)
                    del slot_of[i]
                else:
                    tokens[slot] = got[i][0][-1]
            if step == 2:
                admit(3)  # admitted now, steps from the next round on (its row decodes a dummy meanwhile)
            if step == 7:
                admit(4)  # takes the slot request 0 freed
                assert slot_of[4] == 0
            if tokens:
                highest = max(highest, max(tokens) + 1)
                out = dec.step(tokens)
                for i, slot in slot_of.items():
                    if slot in out:
                        logits[i] = out[slot]
            step += 1
        assert highest >= 3 and dec.active == []
        for i, (toks, lg) in enumerate(solo):
            k = len(got[i][0])
            assert got[i][0] == toks[:k], f"request {i}: {got[i][0]} != {toks[:k]}"
            for a, b in zip(got[i][1], lg):
                np.testing.assert_allclose(a, b, atol=2e-4, rtol=0, err_msg=f"request {i}")
    finally:
        pipe.close()


def test_decoder_batch_axis_is_declared(tiny_artifacts, mllama_artifacts):
    for art in (tiny_artifacts, mllama_artifacts):
        m = json.loads((art / "manifest.json").read_text())
        assert m["limits"]["max_batch"] == 8
        dec = m["components"]["decoder"]["spec"]
        assert dec["dims"]["batch"] == {"min": 1, "opt": 1, "max": 8}
        assert dec["profiles"]["decode"]["batch"]["max"] == 8 and dec["profiles"]["prefill"]["batch"]["max"] == 1


def test_engine_frees_a_cancelled_request_at_once(tiny_artifacts):
    from mmexport.runtime.pipeline import Pipeline
    from mmexport.serve.engine import Engine, GenRequest

    pipe = Pipeline(tiny_artifacts)
    engine = Engine(pipe, 2).start()
    try:
        events, done = [], threading.Event()
        req = GenRequest(pipe.prepare("Tell me a long story.", []), 64, ignore_eos=True)

        def on_event(ev):  # runs on the engine thread: the cancel is seen by its next iteration
            events.append(ev)
            if ev.kind == "text" and sum(e.kind == "text" for e in events) == 3:
                req.cancel()
            if ev.kind == "done":
                done.set()

        req.on_event = on_event
        engine.submit(req)
        assert done.wait(30)
        assert events[-1].finish_reason == "cancelled" and events[-1].usage["completion_tokens"] == 3
        assert engine.running == 0 and engine.decoder.free_slot() == 0 and engine.decoder.active == []
        # the slot serves the next request as if nothing had happened
        ref = pipe.generate("Hello there", max_new_tokens=8)
        out, done2 = [], threading.Event()
        engine.submit(GenRequest(pipe.prepare("Hello there", []), 8,
                                 on_event=lambda ev: out.append(ev.token_id) if ev.kind == "text" else done2.set()))
        assert done2.wait(30)
        assert [t for t in out if t is not None] == ref.token_ids
    finally:
        engine.stop()
        pipe.close()
