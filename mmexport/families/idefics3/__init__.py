"""Idefics3 (Method A): each image split into square tiles plus a global view, a SigLIP-style ViT over the batch
of tiles, a pixel-shuffle + linear connector, and a Llama decoder; SmolVLM (families/smolvlm) is the same."""
from .. import Family

FAMILY = Family(
    name="idefics3",
    title="Idefics3",
    method="A",
    model_types=("idefics3",),
    adapter="mmexport.families.idefics3.export:Idefics3Adapter",
    runtime="mmexport.families.idefics3.runtime:Idefics3Runtime",
)
