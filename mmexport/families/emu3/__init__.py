"""Emu3 (Method A, image understanding): a VQ-VAE image tokenizer turns the image into discrete codes, which
become ordinary vocabulary tokens (one row of codes + an end-of-line token per latent row) in a Llama-like
decoder."""
from .. import Family

FAMILY = Family(
    name="emu3",
    title="Emu3",
    method="A",
    model_types=("emu3",),
    adapter="mmexport.families.emu3.export:Emu3Adapter",
    runtime="mmexport.families.emu3.runtime:Emu3Runtime",
)
