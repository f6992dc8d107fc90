"""Gemma 3 (Method A): a SigLIP ViT (one fixed-size picture per image), an average-pool + RMSNorm + matmul projector
(256 soft tokens), and a Gemma 3 decoder (sliding-window and global layers, local/global rotary) in which the soft
tokens of one image attend each other bidirectionally; built on families/towers.py."""
from .. import Family

FAMILY = Family(
    name="gemma3",
    title="Gemma 3",
    method="A",
    model_types=("gemma3",),
    adapter="mmexport.families.gemma3.export:Gemma3Adapter",
    runtime="mmexport.families.gemma3.runtime:Gemma3Runtime",
)
