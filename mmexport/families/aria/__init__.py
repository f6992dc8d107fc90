"""Aria (Method A): an Idefics3 (SigLIP-style) vision tower over fixed-size crops with a pixel mask, a
cross-attention projector that pools each crop into a fixed number of queries, and a mixture-of-experts
decoder (exported densely: every expert over every token, see families/experts.py)."""
from .. import Family

FAMILY = Family(
    name="aria",
    title="Aria",
    method="A",
    model_types=("aria",),
    adapter="mmexport.families.aria.export:AriaAdapter",
    runtime="mmexport.families.aria.runtime:AriaRuntime",
)
