"""LLaVA-1.5 (Method A): a CLIP ViT (one fixed-size picture per image, a chosen hidden layer without its class
token), a two-layer MLP projector, and a Llama decoder; built on families/towers.py."""
from .. import Family

FAMILY = Family(
    name="llava",
    title="LLaVA-1.5",
    method="A",
    model_types=("llava",),
    adapter="mmexport.families.llava.export:LlavaAdapter",
    runtime="mmexport.families.llava.runtime:LlavaRuntime",
)
