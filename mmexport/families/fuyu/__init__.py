"""Fuyu (Method A without an image encoder): 30x30 patches through one linear layer straight into a Persimmon
decoder, |SPEAKER| tokens per patch and one |NEWLINE| per row of patches."""
from .. import Family

FAMILY = Family(
    name="fuyu",
    title="Fuyu",
    method="A",
    model_types=("fuyu",),
    adapter="mmexport.families.fuyu.export:FuyuAdapter",
    runtime="mmexport.families.fuyu.runtime:FuyuRuntime",
)
