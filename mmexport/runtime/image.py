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
    """Open and fully decode an image file, with its EXIF orientation applied as transformers'
    `load_image` applies it (`PIL.ImageOps.exif_transpose`: a phone photo stored sideways with an
    Orientation tag comes out upright); no mode conversion.

    Only a regular file is opened (checked before opening, without blocking: a FIFO or a device is
    refused, not read). Raises UserError for a missing file, a directory or other non-regular file, or a
    file that is not a decodable image (unknown format, truncated or corrupt data).
    """
    from PIL import ImageOps

    from ..artifact.files import NotRegularFile, open_regular

    try:
        with open_regular(path) as f, Image.open(f) as im:
            im.load()
            # exif_transpose returns a new image (transposed, or a copy), detached from the file; copy()
            # semantics keep mode and info (multi-frame formats would keep the file open otherwise).
            image = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except NotRegularFile as e:
        raise UserError(f"not an image file: {path} (it is a {e.kind})") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"not an image file: {path} (unrecognized image format)") from None
    except PermissionError as e:
        raise UserError(f"cannot read image: {path} ({e.strerror or e})") from None
    except Exception as e:
        # Pillow reports truncated / corrupt data as OSError, SyntaxError (bad chunk), ValueError or EOFError,
        # and a malformed EXIF block as whatever its parser hits (struct.error, KeyError, ...): all are the file's.
        reason = str(e).strip() or type(e).__name__
        raise UserError(f"not an image file: {path} ({reason})") from None
    return image
