"""data.py: the circles generator ([ZSI] Sec. 5.5), image files and folders, batches."""
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cli import InputError
from data import (Batches, circle_positions, circles_dataset, load_image_folder, load_images, read_rgb,
                  render_circles, to_float, to_uint8)


def test_circle_support_64_matches_official():
    pos = circle_positions(64)
    assert len(pos) == 1200
    assert sorted(set(pos[:, 0])) == list(range(2, 12)) + list(range(52, 62))
    assert sorted(set(pos[:, 1])) == list(range(2, 62))


def test_circle_support_32_and_full_range():
    pos = circle_positions(32)
    assert sorted(set(pos[:, 0])) == [2, 3, 4, 5, 26, 27, 28, 29] and len(pos) == 224
    assert sorted(set(circle_positions(32, full_range=True)[:, 0])) == list(range(2, 30))


def test_disc_is_21_white_pixels_centred_on_its_position():
    img = render_circles(np.array([[9, 20]]), 32)[0]
    assert set(np.unique(img)) == {0, 255}
    ys, xs = np.nonzero(img[..., 0])
    assert len(xs) == 21 and xs.mean() == 9 and ys.mean() == 20


def test_circles_dataset_labels_and_determinism():
    a, la, pa = circles_dataset(32, seed=1)
    b, lb, pb = circles_dataset(32, seed=1)
    c, _, pc = circles_dataset(32, seed=2)
    assert np.array_equal(a, b) and np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    assert (la == (pa[:, 0] >= 16)).all() and la.mean() == 0.5


def test_image_folder_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i % 2}_{i}.png")
    images, labels, classes = load_image_folder(tmp_path)        # files are read in sorted name order
    order = sorted(range(4), key=lambda i: f"{i % 2}_{i}.png")
    assert classes == ["0", "1"] and labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(images, imgs[order])
    with pytest.raises(InputError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .png"):
        load_image_folder(tmp_path / "empty")


def test_float_uint8_conversion_truncates_like_official():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    back = to_uint8(to_float(u8)).astype(int)
    assert (back <= u8).all() and (u8 - back <= 1).all()                  # float32 round-off, then truncation
    assert to_uint8(torch.full((1, 1, 1, 1), 0.999))[0, 0, 0, 0] == 254   # (x+1)·127.5 = 254.87 -> 254


def test_mirror_batches_swap_labels_consistently():
    images, labels, pos = circles_dataset(32)
    batches = Batches(images, labels, 256, flip="swap", seed=0)
    x, y = next(batches)
    centre = (x[:, 0] > 0).float().mul(torch.arange(32.0)).sum((1, 2)) / (x[:, 0] > 0).float().sum((1, 2))
    assert ((centre >= 16).long() == y).all()


def test_batch_size_zero_is_refused():
    with pytest.raises(InputError, match="batch size"):
        Batches(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2), 0)


def test_intensity_augmentation_dims_discs_keeps_background_and_labels():
    images, labels, _ = circles_dataset(32)
    plain = Batches(images, labels, 256, seed=3)
    dimmed = Batches(images, labels, 256, seed=3, intensity=0.2)
    (x, y), (xd, yd) = next(plain), next(dimmed)
    assert torch.equal(y, yd)                                       # same images drawn, labels untouched
    assert torch.equal(xd[x == -1], x[x == -1])                     # black background stays black
    scale = (xd.amax((1, 2, 3)) + 1) / 2                            # the white disc's new level, in [0.2, 1]
    assert scale.min() >= 0.2 - 1e-6 and scale.max() <= 1 + 1e-6 and scale.std() > 0.1
    assert torch.allclose(xd, scale.view(-1, 1, 1, 1) * (x + 1) - 1, atol=1e-6)
    assert torch.equal(next(Batches(images, labels, 256, seed=3, intensity=1.0))[0], x)   # 1 = off, same stream
    with pytest.raises(InputError, match="intensity"):
        Batches(images, labels, 4, intensity=1.5)


# ---------------------------------------------------------------------------------------------------
# Image files decode to what a viewer shows (read_rgb, behind load_image_folder and load_images)
# ---------------------------------------------------------------------------------------------------

WHITE = [255, 255, 255]


def _one_file_folder(tmp_path, save):
    """Folder holding one image file written by save(path); returns the loaded uint8 [H, W, 3] image."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    save(folder / "0_0.png")
    images, labels, _ = load_image_folder(folder)
    assert images.shape[0] == 1 and labels.tolist() == [0]
    return images[0]


def _add_png_chunk(path, kind, payload):
    """Insert a chunk right after IHDR (the first chunk: bytes 8..33 of the file)."""
    data = path.read_bytes()
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    path.write_bytes(data[:33] + chunk + data[33:])


def _srgb_encode(u):
    """The sRGB transfer function (IEC 61966-2-1) of linear u in [0, 1], as an 8-bit value."""
    return round(255 * (12.92 * u if u <= 0.0031308 else 1.055 * u ** (1 / 2.4) - 0.055))


def _linear_srgb_icc():
    """An ICC v2 matrix/TRC RGB profile: sRGB's D50-adapted primaries with a linear (gamma 1) curve."""
    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 256) + bytes(2)           # gamma 1.0 (u8Fixed8)
    tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(24) + struct.pack(">I", 0) + xyz(0.9642, 1.0, 0.8249)[8:] + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_16bit_grey_ramp_keeps_the_high_byte(tmp_path):
    ramp = (np.arange(16, dtype=np.uint16) * 4369).reshape(1, 16)                 # 0, 4369, ..., 65535
    img = _one_file_folder(tmp_path, lambda p: cv2.imwrite(str(p), ramp))
    assert img.shape == (1, 16, 3)
    assert img[0, :, 0].tolist() == [17 * k for k in range(16)]                  # 4369 k >> 8 = 17 k
    assert (img == img[..., :1]).all()


def test_16bit_grey_low_byte_is_dropped_by_the_celeba_loader(tmp_path):
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    cv2.imwrite(str(tmp_path / "g.png"), 256 * k + 255)                          # floor((256 k + 255) / 256) = k
    out = load_images([tmp_path / "g.png"], 16)[0]                               # 16 -> 16: no resampling
    assert np.array_equal(out, np.repeat(k.astype(np.uint8)[..., None], 3, -1))


def test_16bit_rgb_png_keeps_high_bytes_and_its_colour_key(tmp_path):
    rgb = np.array([[[0x12FF, 0x0180, 0xFFFF], [0x0000, 0x8000, 0x7FFF]]], np.uint16)
    path = tmp_path / "0_0.png"
    cv2.imwrite(str(path), rgb[..., ::-1])                                       # OpenCV writes BGR
    assert read_rgb(path).tolist() == [[[0x12, 0x01, 0xFF], [0x00, 0x80, 0x7F]]]
    _add_png_chunk(path, b"tRNS", struct.pack(">3H", 0x12FF, 0x0180, 0xFFFF))   # first pixel's exact colour
    assert read_rgb(path).tolist() == [[WHITE, [0x00, 0x80, 0x7F]]]


def test_16bit_grey_colour_key_is_transparent(tmp_path):
    def save(p):
        Image.fromarray(np.array([[0, 4369, 65535]], np.uint16)).save(p, transparency=0)
    assert _one_file_folder(tmp_path, save)[0].tolist() == [WHITE, [17] * 3, [255] * 3]   # black 0 is the key


def test_transparent_pixel_shows_the_background_and_partial_alpha_blends(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [100, 0, 200, 128], [10, 20, 30, 255]]], np.uint8)
    img = _one_file_folder(tmp_path, lambda p: Image.fromarray(rgba, "RGBA").save(p))
    # on white: round((c·128 + 255·127) / 255): (12800 + 32385) / 255 = 177.2, 32385 / 255 = 127, 57985 / 255 = 227.4
    assert img[0].tolist() == [WHITE, [177, 127, 227], [10, 20, 30]]
    black = read_rgb(tmp_path / "imgs" / "0_0.png", background=(0, 0, 0))
    assert black[0].tolist() == [[0, 0, 0], [50, 0, 100], [10, 20, 30]]       # 12800 / 255 = 50.2, 25600 / 255 = 100.4


def test_palette_transparency_is_honoured(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.putdata([0, 1, 2])
    img = _one_file_folder(tmp_path, lambda p: pal.save(p, transparency=1))    # index 1 (green) is transparent
    assert img[0].tolist() == [[255, 0, 0], WHITE, [0, 0, 255]]
    pal.save(tmp_path / "alphas.png", transparency=bytes([255, 0, 128]))         # per-index alpha: 255, 0, 128
    assert read_rgb(tmp_path / "alphas.png")[0].tolist() == [[255, 0, 0], WHITE, [127, 127, 255]]  # 32385 / 255


def test_grey_alpha_one_bit_and_grey_colour_key(tmp_path):
    la = np.array([[[200, 0], [200, 128], [200, 255]]], np.uint8)
    img = _one_file_folder(tmp_path, lambda p: Image.fromarray(la, "LA").save(p))
    assert img[0].tolist() == [WHITE, [227] * 3, [200] * 3]                      # (25600 + 32385) / 255 = 227.4
    bits = Image.new("1", (3, 1))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    assert read_rgb(tmp_path / "bits.png")[0].tolist() == [[0, 0, 0], WHITE, [0, 0, 0]]
    Image.fromarray(np.array([[10, 20, 30]], np.uint8)).save(tmp_path / "key.png", transparency=20)
    assert read_rgb(tmp_path / "key.png", background=(0, 0, 255))[0].tolist() == [[10] * 3, [0, 0, 255], [30] * 3]


@pytest.mark.parametrize("orientation, shape, corner", [(1, (2, 3), (0, 0)), (3, (2, 3), (1, 2)),
                                                        (6, (3, 2), (0, 1)), (8, (3, 2), (2, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, shape, corner):
    # stored 3 wide × 2 tall, red at the stored top-left; 3 = rotate 180°, 6 = 90° clockwise, 8 = 90° anticlockwise
    stored = np.zeros((2, 3, 3), np.uint8)
    stored[0, 0] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = _one_file_folder(tmp_path, lambda p: Image.fromarray(stored).save(p, exif=exif))
    expected = np.zeros(shape + (3,), np.uint8)
    expected[corner] = [255, 0, 0]
    assert np.array_equal(img, expected)


def test_exif_rotated_jpeg_is_shown_upright(tmp_path):
    stored = np.zeros((32, 48, 3), np.uint8)                                     # 48 wide × 32 tall, black
    stored[:16, :16] = 255                                                       # white 16×16 block top-left
    exif = Image.Exif()
    exif[0x0112] = 6                                                             # display rotated 90° clockwise
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    img = read_rgb(tmp_path / "photo.jpg").astype(int)
    assert img.shape == (48, 32, 3)                                              # displayed 32 wide × 48 tall
    assert img[2:14, 18:30].min() >= 250 and img[:, :14].max() <= 5 and img[18:, :].max() <= 5   # block top-right


def test_cmyk_jpeg_shows_the_naive_viewer_colours(tmp_path):
    cmyk = np.zeros((8, 32, 4), np.uint8)                                        # four flat 8×8 blocks
    cmyk[:, :8] = [128, 0, 0, 128]        # R = (255-128)(255-128)/255 = 63.25, G = B = 255·127/255 = 127
    cmyk[:, 8:16] = [0, 255, 0, 0]        # magenta ink alone: (255, 0, 255)
    cmyk[:, 16:24] = [0, 0, 0, 255]       # black ink: (0, 0, 0)
    cmyk[:, 24:] = [0, 0, 0, 0]           # no ink: white paper
    expected = [[63, 127, 127], [255, 0, 255], [0, 0, 0], WHITE]
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "tif.tif")                    # lossless reference
    assert read_rgb(tmp_path / "tif.tif")[0, ::8].tolist() == expected
    img = _one_file_folder(tmp_path, lambda p: Image.fromarray(cmyk, "CMYK").save(p.with_suffix(".jpg"), quality=100))
    assert np.abs(img[4, 4::8].astype(int) - expected).max() <= 2                # JPEG (Adobe-inverted CMYK)


def test_icc_profile_is_converted_to_srgb(tmp_path):
    linear = np.array([[[128, 64, 0], [255, 255, 255]]], np.uint8)
    Image.fromarray(linear).save(tmp_path / "lin.png", icc_profile=_linear_srgb_icc())
    got = read_rgb(tmp_path / "lin.png").astype(int)
    expected = [[[_srgb_encode(128 / 255), _srgb_encode(64 / 255), 0], WHITE]]    # 188, 137, 0
    assert np.abs(got - expected).max() <= 1
    Image.fromarray(linear).save(tmp_path / "bad.png", icc_profile=b"not a profile" * 20)
    assert read_rgb(tmp_path / "bad.png").tolist() == linear.tolist()           # unusable profile: raw values


def test_integer_and_float_modes_scale_like_16_bit_and_unit_range(tmp_path):
    Image.fromarray(np.array([[-5, 0, 255, 256, 65535, 70000]], np.int32)).save(tmp_path / "i.tif")
    assert read_rgb(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 0, 0, 1, 255, 255]
    f = np.array([[-0.5, 0, 0.25, 0.5, 1, 2, np.nan]], np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert read_rgb(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 0]   # 63.75, 127.5 round up


def test_unreadable_image_is_a_one_line_error(tmp_path):
    (tmp_path / "0_0.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"cannot read image .*0_0\.png.*8-bit RGB PNG") as err:
        load_image_folder(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="cannot read image"):
        load_images([tmp_path / "missing.jpg"], 8)


# ---------------------------------------------------------------------------------------------------
# Labels, index files, oversampling, conversions and batches: hand-made cases
# ---------------------------------------------------------------------------------------------------

def test_celeba_labels_of_one_two_and_pair_attributes():
    from data import celeba_labels
    names = ["A", "B", "C"]
    values = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=np.uint8)
    labels, mask = celeba_labels(values, names, ["B"])
    assert labels.tolist() == [1, 0, 1, 0] and mask.tolist() == [True] * 4 and labels.dtype == np.int64
    labels, mask = celeba_labels(values, names, ["A", "C"])       # 0 = a & c, 1 = a & not c, 2 = not a & c, 3
    assert labels.tolist() == [1, 0, 2, 3] and mask.all()
    labels, mask = celeba_labels(values, names, ["A/B"])          # A on the rows with exactly one of A, B
    assert labels.tolist() == [1, 1, 0, 0] and mask.tolist() == [False, True, True, False]
    labels, mask = celeba_labels(values, names, ["A/B", "C"])
    assert labels.tolist() == [1, 0, 2, 3] and mask.tolist() == [False, True, True, False]
    labels, mask = celeba_labels(values, names, ["A/B", "B/C"])   # both pairs must differ
    assert labels.tolist() == [0, 1, 2, 3] and mask.tolist() == [False, True, False, False]
    with pytest.raises(InputError, match=r"--attr A,Z: give one or two CelebA attributes .* of A, B, C"):
        celeba_labels(values, names, ["A", "Z"])
    for bad in (["A", "B", "C"], [], ["A/B/C"]):
        with pytest.raises(InputError, match="--attr takes one or two attributes"):
            celeba_labels(values, names, bad)


def test_read_index_file_parses_integers_and_names_what_is_wrong(tmp_path):
    from data import read_index_file
    f = tmp_path / "idx.txt"
    f.write_text("3\n0\n 5\n")
    idx = read_index_file(f)
    assert idx.tolist() == [3, 0, 5] and idx.dtype == np.int64
    with pytest.raises(InputError, match="does not exist"):
        read_index_file(tmp_path / "missing.txt")
    f.write_text("3\nx\n")
    with pytest.raises(InputError, match="malformed"):
        read_index_file(f)


def test_oversample_repeats_in_place_and_checks_its_spec():
    from data import oversample
    images, labels = np.arange(5) * 10, np.array([0, 1, 0, 1, 2])
    im, lab = oversample(images, labels, "0:2")
    assert im.tolist() == [0, 0, 10, 20, 20, 30, 40] and lab.tolist() == [0, 0, 1, 0, 0, 1, 2]
    im, lab = oversample(images, labels, "0:2,2:3")
    assert im.tolist() == [0, 0, 10, 20, 20, 30, 40, 40, 40]
    assert oversample(images, labels, "") == (images, labels)
    assert oversample(images, labels, None)[0] is images
    im, lab = oversample(images, labels, "1:1")
    assert im.tolist() == images.tolist()
    with pytest.raises(InputError, match="factors must be integers >= 1"):
        oversample(images, labels, "0:0")
    with pytest.raises(InputError, match="CLASS:FACTOR"):
        oversample(images, labels, "0:2:1")


def test_float_conversions_and_channel_mean_stats_by_hand():
    from beyond.cpu_preset import channel_mean_stats
    u8 = np.array([[[[0, 255, 51], [255, 102, 0]]]], dtype=np.uint8)      # [1, 1, 2, 3]
    x = to_float(u8)
    assert x.shape == (1, 3, 1, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))
    torch.testing.assert_close(x[0, :, 0, 1], torch.tensor([1.0, -0.2, -1.0]))
    back = to_uint8(torch.tensor([[[[1.5, -2.0]], [[0.0, -1.0]]]]))        # [1, 2, 1, 2] -> [1, 1, 2, 2]
    assert back.shape == (1, 1, 2, 2) and back.dtype == np.uint8
    assert back[0, 0].tolist() == [[255, 127], [0, 0]]                     # clamp; 127.5 truncates to 127
    images = np.array([[[[0, 255], [255, 255]]], [[[0, 0], [0, 0]]]], dtype=np.uint8)   # [2, 1, 2, 2]
    stats = channel_mean_stats(images)        # channel means in [-1, 1]: image 0 (0, 1), image 1 (-1, -1)
    assert stats["mean"] == pytest.approx([-0.5, 0.0]) and stats["var"] == pytest.approx([0.25, 1.0])


def test_sizes_dataset_small_by_hand():
    from data import sizes_dataset
    images, labels, radii = sizes_dataset(12, 2, 4, 0.34)       # k = round(0.34 · 3) = 1: radii 2 and 4
    assert sorted(set(radii.tolist())) == [2, 4] and len(images) == 2 * 4 * 4    # centres 4..7 in x and y
    assert labels.tolist() == (radii > 3).astype(int).tolist() and labels.sum() == 16
    assert images.shape == (32, 12, 12, 3) and images.dtype == np.uint8
    areas = (images[..., 0] > 127).sum((1, 2))
    assert set(areas[radii == 2]) == {21} and areas[radii == 4].min() > 21
    assert labels.dtype == np.int64
    _, full_labels, full_radii = sizes_dataset(12, 2, 4, 0.34, full_range=True)
    assert sorted(set(full_radii.tolist())) == [2, 3, 4]
    assert (full_labels[full_radii == 3] == 0).all()              # r = (r_min + r_max) / 2 is not large
    again = sizes_dataset(12, 2, 4, 0.34)
    other = sizes_dataset(12, 2, 4, 0.34, seed=1)
    assert np.array_equal(again[0], images) and not np.array_equal(other[2], radii)
    assert sorted(set(sizes_dataset(12, 2, 4, 0.0)[2].tolist())) == [2, 4]       # at least one radius per side
    with pytest.raises(InputError, match="too small"):
        sizes_dataset(8, 2, 4)


def test_batches_draw_with_the_generator_and_shard():
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3) * 3
    labels = np.array([0, 1, 0, 1, 0, 1])
    b = Batches(images, labels, 4, seed=5)
    assert len(b) == 6 and iter(b) is b
    x, y = next(b)
    idx = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, to_float(images[idx.numpy()]))
    assert y.tolist() == labels[idx.numpy()].tolist()
    odd = Batches(images, labels, 3, shard=(1, 2))
    assert len(odd) == 3 and (next(odd)[1] == 1).all()
    flipped = Batches(images, labels, 64, flip="keep", seed=0)     # "keep": the labels stay
    x, y = next(flipped)
    idx = torch.randint(0, 6, (64,), generator=torch.Generator().manual_seed(0))
    plain = to_float(images[idx.numpy()])
    mirrored = (x == plain.flip(-1)).all((1, 2, 3))
    assert y.tolist() == labels[idx.numpy()].tolist() and mirrored.any() and not mirrored.all()
    assert ((x == plain).all((1, 2, 3)) | mirrored).all()
    Batches(images, labels, 1, intensity=0.0)
    with pytest.raises(InputError, match="intensity"):
        Batches(images, labels, 1, intensity=-0.1)


def test_circles_dataset_full_range_labels_from_the_centre_and_radius():
    images, labels, pos = circles_dataset(15, radius=3, full_range=True)
    assert sorted(set(pos[:, 0].tolist())) == list(range(3, 12)) and labels.dtype == np.int64
    assert labels.tolist() == (pos[:, 0] >= 7).astype(int).tolist()            # x >= W // 2 = 7 is "right"
    assert ((images[..., 0] > 127).sum((1, 2)) > 21).all()                      # radius-3 discs, not radius 2


def test_runs_store_absolute_data_paths_and_sampling_checks_them_first(tmp_path, monkeypatch):
    """A run's config holds absolute paths (sample.py may run from another folder); a run whose data is gone fails
    with one line before sampling (its reports read the data after)."""
    from cli import InputError
    from config import build_config, parse_args
    from data import check_data_paths
    (tmp_path / "imgs").mkdir()
    (tmp_path / "sub.txt").write_text("0\n")
    monkeypatch.chdir(tmp_path)
    d = build_config(parse_args(["--data", "celeba", "--data-dir", "imgs", "--subset", "sub.txt"]))["data"]
    assert d["path"] == str(tmp_path / "imgs") and d["subset"] == str(tmp_path / "sub.txt")
    assert build_config(parse_args(["--data", "folder", "--data-dir", "imgs"]))["data"]["path"] == str(tmp_path / "imgs")
    check_data_paths(d)
    check_data_paths(dict(name="circles", image_size=32))                     # generated: nothing to read
    (tmp_path / "sub.txt").unlink()
    with pytest.raises(InputError, match=r"subset .*sub.txt\) is not there"):
        check_data_paths(d)
    with pytest.raises(InputError, match=r"\(path moved\) is not there"):
        check_data_paths(dict(name="folder", path="moved"))
