"""Molmo2 (Method A): a ViT over overlapping crops (global view + tiles) whose chosen layers are concatenated,
an attention-pooling adapter over 2x2 patch windows, and a Qwen3/OLMo-style decoder; pooled features are
added to the `<im_patch>` tokens' embeddings, and every image token sees every other one."""
from .. import Family

FAMILY = Family(
    name="molmo2",
    title="Molmo2",
    method="A",
    model_types=("molmo2",),
    adapter="mmexport.families.molmo2.export:Molmo2Adapter",
    runtime="mmexport.families.molmo2.runtime:Molmo2Runtime",
)
