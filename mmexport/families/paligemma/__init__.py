"""PaliGemma / PaliGemma 2 (Method A): a SigLIP ViT (one fixed-size picture per image), a linear projector, and a
Gemma / Gemma 2 decoder whose whole prompt (images + text prefix) attends bidirectionally (prefix-LM); built on
families/towers.py."""
from .. import Family

FAMILY = Family(
    name="paligemma",
    title="PaliGemma",
    method="A",
    model_types=("paligemma",),
    adapter="mmexport.families.paligemma.export:PaliGemmaAdapter",
    runtime="mmexport.families.paligemma.runtime:PaliGemmaRuntime",
)
