"""Mistral 3 (Method A): the Pixtral vision tower (2D rotary over one image at its own size), the patch
merger + RMSNorm + MLP projector, and a Mistral decoder with 1D positions."""
from .. import Family

FAMILY = Family(
    name="mistral3",
    title="Mistral 3",
    method="A",
    model_types=("mistral3",),
    adapter="mmexport.families.mistral3.export:Mistral3Adapter",
    runtime="mmexport.families.mistral3.runtime:Mistral3Runtime",
)
