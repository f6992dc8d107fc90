"""Qwen3-VL (Method A): Qwen2-VL's layout plus learned position embeddings interpolated to the patch grid and
deepstack (features of early ViT layers added to the decoder's hidden states after its first layers)."""
from .. import Family

FAMILY = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    method="A",
    model_types=("qwen3_vl",),
    adapter="mmexport.families.qwen3_vl.export:Qwen3VLAdapter",
    runtime="mmexport.families.qwen3_vl.runtime:Qwen3VLRuntime",
)
