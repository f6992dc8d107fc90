"""LLaVA-OneVision (Method A): a SigLIP tower over a batch of views (anyres tiles + a base view), an MLP projector,
the tiles' features unpadded with an image_newline token per row, and a Qwen2 decoder (the generic one)."""
from .. import Family

FAMILY = Family(
    name="llava_onevision",
    title="LLaVA-OneVision",
    method="A",
    model_types=("llava_onevision",),
    adapter="mmexport.families.llava_onevision.export:OnevisionAdapter",
    runtime="mmexport.families.llava_onevision.runtime:OnevisionRuntime",
)
