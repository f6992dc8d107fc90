"""Opening image files for the runtime (Pillow; no torch).

Preprocessing lives with each family (mmexport/families/*/image.py), composed from the shared operations
in mmexport.runtime.imageops.
"""
from __future__ import annotations

import os

from PIL import Image

from mmexport.errors import UserError

__all__ = ["load_image"]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file (no mode conversion, no EXIF rotation).

    Raises UserError for a missing file, a directory, or a file that is not a decodable image (unknown format,
    truncated or corrupt data).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UserError(f"image not found: {path}")
    if os.path.isdir(p):
        raise UserError(f"not an image file: {path} (it is a directory)")
    try:
        with Image.open(p) as im:
            im.load()
            # Detach from the file (multi-frame formats keep it open otherwise); copy() keeps mode and info.
            image = im.copy()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"not an image file: {path} (unrecognized image format)") from None
    except PermissionError as e:
        raise UserError(f"cannot read image: {path} ({e.strerror or e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # Pillow reports truncated / corrupt data as OSError, SyntaxError (bad chunk), ValueError or EOFError.
        reason = str(e).strip() or type(e).__name__
        raise UserError(f"not an image file: {path} ({reason})") from None
    return image
