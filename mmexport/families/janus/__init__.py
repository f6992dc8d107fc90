"""Janus / Janus-Pro (Method A), image understanding: a SigLIP-style vision tower over a fixed 384x384 image, the
aligner (an MLP projector), and a Llama decoder; the image-generation path (VQ model, generation head) is not
exported."""
from .. import Family

FAMILY = Family(
    name="janus",
    title="Janus",
    method="A",
    model_types=("janus",),
    adapter="mmexport.families.janus.export:JanusAdapter",
    runtime="mmexport.families.janus.runtime:JanusRuntime",
)
