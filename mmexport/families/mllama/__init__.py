"""Llama 3.2 Vision / mllama (Method B): a tiled ViT, a projector, and a Llama decoder whose
cross-attention layers read keys/values computed once per request from the image states."""
from .. import Family

FAMILY = Family(
    name="mllama",
    title="Llama 3.2 Vision",
    method="B",
    model_types=("mllama",),
    adapter="mmexport.families.mllama.export:MllamaAdapter",
    runtime="mmexport.families.mllama.runtime:MllamaRuntime",
)
