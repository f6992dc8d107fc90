"""InternVL (-hf format, Method A): dynamic tiling to a grid of square tiles chosen by aspect ratio plus a
thumbnail, InternViT over the batch of tiles, pixel shuffle + MLP projector, and a Qwen2 (or other) decoder."""
from .. import Family

FAMILY = Family(
    name="internvl",
    title="InternVL",
    method="A",
    model_types=("internvl",),
    adapter="mmexport.families.internvl.export:InternVLAdapter",
    runtime="mmexport.families.internvl.runtime:InternVLRuntime",
)
