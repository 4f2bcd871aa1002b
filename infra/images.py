"""Image files as an image viewer shows them: `read_rgb` decodes any file Pillow opens to the 8-bit sRGB picture a
viewer displays (EXIF orientation, 16-bit and float samples, transparency over white, ICC profiles), for data.py's
folders and CelebA and for sample.py's --images. Any decoding error of a file is one InputError line naming it.
"""
import functools
import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

from cli import InputError

BACKGROUND = (255, 255, 255)   # what transparent pixels show: white, a web browser's default page colour
_GREY16 = ("I", "I;16", "I;16L", "I;16B", "I;16N")


@functools.cache
def _srgb_profile():
    """The LittleCMS sRGB profile, built on first use."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _png_bit_depth(path):
    """The IHDR bit depth of a PNG file (byte 24: the signature, then IHDR is always the first chunk)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 else 8


def read_rgb(path, background=BACKGROUND):
    """uint8 [H, W, 3]: the 8-bit sRGB picture an ordinary image viewer shows for the image file at `path`.

    H, W are the displayed size. Any Pillow mode and the metadata a viewer honours:
      - orientation: the EXIF Orientation tag is applied (ImageOps.exif_transpose); 6 and 8 swap H and W;
      - bit depth: 16-bit samples keep their high byte, v >> 8 = floor(v / 256) (Pillow's own rule for 16-bit
        RGB/RGBA/LA PNGs, applied here to 16-bit grey, modes I;16*, and to mode I after clipping to
        [0, 65535]); mode F (float) is read as [0, 1] = black..white, the float-TIFF convention, as
        round(255 · clip(v, 0, 1)), NaN as 0; mode 1 is 0/255;
      - transparency (alpha of RGBA/LA/PA/RGBa/La, palette tRNS, colour-key tRNS of 1/L/I;16/RGB, where a
        16-bit RGB key is matched on its high bytes) is composited onto `background` (RGB triple, default
        white) as round((c·a + b·(255 - a)) / 255): a fully transparent pixel shows the background, never
        its hidden colour;
      - colour: an embedded ICC profile is converted to sRGB (LittleCMS, perceptual intent); an unusable one
        is ignored, as viewers do. Without a profile, values are sRGB and CMYK maps as R = (255-C)(255-K)/255
        (Pillow's rule, the naive conversion browsers apply; Adobe-inverted CMYK JPEGs are un-inverted by
        Pillow's decoder). LAB, HSV, YCbCr use Pillow's conversions. PNG gAMA/cHRM chunks are not applied.
    Animated files give their first frame. Raises InputError if the file cannot be read as an image.
    """
    try:
        with Image.open(path) as img:
            depth = _png_bit_depth(path) if img.format == "PNG" else 8
            img.load()
            img = ImageOps.exif_transpose(img)          # a transposed copy that keeps img.info
        return np.array(_viewer_rgb(img, depth, tuple(background)))
    except Exception as e:      # any decoder's error (OSError, zlib.error, struct.error, DecompressionBombError, ...)
        raise InputError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                         f"save it as an 8-bit RGB PNG or JPEG") from None


def _viewer_rgb(img, depth, background):
    """RGB PIL image for read_rgb: split off alpha, scale to 8 bits, apply the ICC profile, composite."""
    icc, key, alpha = img.info.get("icc_profile"), img.info.get("transparency"), None
    if img.mode in _GREY16 or img.mode == "F":
        v = np.asarray(img)
        if img.mode == "F":
            grey = np.floor(np.nan_to_num(np.clip(v, 0, 1)) * 255 + 0.5)
        else:
            if isinstance(key, int):
                alpha = Image.fromarray(np.where(v == key, 0, 255).astype(np.uint8))
            grey = np.clip(v.astype(np.int64), 0, 65535) >> 8
        img = Image.fromarray(grey.astype(np.uint8))
    elif img.mode in ("P", "PA", "RGBa", "La"):
        img = img.convert("RGBA" if img.mode != "La" else "LA")
    elif img.mode in ("1", "L", "RGB") and key is not None:
        if img.mode == "RGB" and depth == 16 and isinstance(key, tuple):
            img.info["transparency"] = tuple(k >> 8 for k in key)     # the key is 16-bit, the pixels 8-bit
        img = img.convert("LA" if img.mode != "RGB" else "RGBA")
    if img.mode in ("LA", "RGBA"):
        alpha, img = img.getchannel("A"), img.convert(img.mode[:-1])
    if icc and img.mode in ("L", "RGB", "CMYK"):
        try:
            img = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _srgb_profile(),
                                            outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass                                        # a broken or mismatched profile: show the raw values
    img = img.convert("RGB")
    if alpha is not None:
        img = Image.composite(img, Image.new("RGB", img.size, background), alpha)
    return img


# Pillow modes of grayscale files (data.folder_channels reads such folders as one channel)
GREY_MODES = ("1", "L", "LA", "La", "F") + _GREY16
