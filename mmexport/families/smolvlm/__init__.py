"""SmolVLM (Method A): Idefics3's architecture and tiling (families/idefics3) under its own model_type, processor
and chat template."""
from .. import Family

FAMILY = Family(
    name="smolvlm",
    title="SmolVLM",
    method="A",
    model_types=("smolvlm",),
    adapter="mmexport.families.smolvlm.export:SmolVLMAdapter",
    runtime="mmexport.families.idefics3.runtime:Idefics3Runtime",
)
