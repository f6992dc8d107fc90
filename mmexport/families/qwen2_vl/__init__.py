"""Qwen2-VL (Method A): a ViT with 2D rotary over one image's flat patch sequence, the PatchMerger, and a
Qwen2 decoder with M-RoPE."""
from .. import Family

FAMILY = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    method="A",
    model_types=("qwen2_vl",),
    adapter="mmexport.families.qwen2_vl.export:Qwen2VLAdapter",
    runtime="mmexport.families.qwen2_vl.runtime:Qwen2VLRuntime",
)
