"""Qwen2.5-VL (Method A): Qwen2-VL's preprocessing, prompt and M-RoPE decoder, with a vision tower of RMSNorm /
SwiGLU blocks whose attention is windowed except in `fullatt_block_indexes`, and an RMSNorm patch merger."""
from .. import Family

FAMILY = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    method="A",
    model_types=("qwen2_5_vl",),
    adapter="mmexport.families.qwen2_5_vl.export:Qwen25VLAdapter",
    runtime="mmexport.families.qwen2_5_vl.runtime:Qwen25VLRuntime",
)
