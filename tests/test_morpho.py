"""beyond/morpho.py: Zhang–Suen thinning on hand-computed cases and against a per-pixel transcription of the paper's rules,
and stroke_thickness on antialiased strokes of known width, drawn 16 times finer and area-averaged to 28 × 28 as
MNIST's digits were."""
import cv2
import numpy as np
import pytest

from beyond import morpho
from cli import InputError

SIDE = 28            # MNIST's image side
FINE = 16            # strokes are drawn FINE times finer, then area-averaged: antialiased with 1/16 px precision
WIDTHS = [1.5, 2.0, 2.5, 3.0, 4.0, 5.0]
# Eight sub-pixel positions of a stroke's centre, spread over the pixel (odd multiples of 1/16 px: never on the
# upsampled grid's pixel centres or edges, where the 128 threshold would be an exact tie).
PHASES = [((k + 0.5) / 8, ((3 * k + 1) % 8 + 0.5) / 8) for k in range(8)]


def grid(text):
    """bool [H, W] from rows of '#' (stroke) and '.' (background)."""
    return np.array([[c == "#" for c in row] for row in text.split()])


def fixed_point(xy):
    """28-px coordinates (pixel k spans [k, k + 1)) -> cv2 drawing coordinates on the FINE canvas, 4 fraction bits."""
    return np.round((np.asarray(xy, dtype=np.float64) * FINE - 0.5) * 16).astype(np.int32)


def area_downsample(canvas):
    return cv2.resize(canvas, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def line(width, angle, centre, length=20.0):
    """uint8 [28, 28]: an antialiased straight stroke, a width × length rectangle (flat ends) at `angle` degrees."""
    t = np.deg2rad(angle)
    along, across = np.array([np.cos(t), -np.sin(t)]), np.array([np.sin(t), np.cos(t)])
    corners = [np.add(centre, a * length / 2 * along + b * width / 2 * across)
               for a, b in [(-1, -1), (1, -1), (1, 1), (-1, 1)]]
    canvas = np.zeros((SIDE * FINE, SIDE * FINE), dtype=np.uint8)
    cv2.fillConvexPoly(canvas, fixed_point(corners), 255, cv2.LINE_AA, 4)
    return area_downsample(canvas)


def ring(width, centre, radius=7.0):
    """uint8 [28, 28]: an antialiased ring of the given width around a circle of `radius` px (no ends)."""
    canvas = np.zeros((SIDE * FINE, SIDE * FINE), dtype=np.uint8)
    c = tuple(int(v) for v in fixed_point(centre))
    cv2.circle(canvas, c, int(round((radius + width / 2) * FINE * 16)), 255, -1, cv2.LINE_AA, 4)
    cv2.circle(canvas, c, int(round((radius - width / 2) * FINE * 16)), 0, -1, cv2.LINE_AA, 4)
    return area_downsample(canvas)


def strokes(shape, width):
    """uint8 [8, 28, 28]: the stroke at the eight PHASES around the image centre."""
    centres = [(13.5 + dx, 13.5 + dy) for dx, dy in PHASES]
    if shape == "ring":
        return np.stack([ring(width, c) for c in centres])
    return np.stack([line(width, shape, c) for c in centres])


def zhang_suen_loops(mask):
    """The oracle: Zhang & Suen 1984 transcribed pixel by pixel (P2 = north, clockwise to P9 = north-west)."""
    img = np.pad(mask.astype(int), 1)
    while True:
        changed = False
        for first in (True, False):
            marked = []
            for i in range(1, img.shape[0] - 1):
                for j in range(1, img.shape[1] - 1):
                    if not img[i, j]:
                        continue
                    P2, P3, P4, P5 = img[i - 1, j], img[i - 1, j + 1], img[i, j + 1], img[i + 1, j + 1]
                    P6, P7, P8, P9 = img[i + 1, j], img[i + 1, j - 1], img[i, j - 1], img[i - 1, j - 1]
                    cycle = [P2, P3, P4, P5, P6, P7, P8, P9, P2]
                    B = sum(cycle[:8])
                    A = sum(1 for u, v in zip(cycle, cycle[1:]) if (u, v) == (0, 1))
                    c, d = (P2 * P4 * P6, P4 * P6 * P8) if first else (P2 * P4 * P8, P2 * P6 * P8)
                    if 2 <= B <= 6 and A == 1 and c == 0 and d == 0:
                        marked.append((i, j))
            for i, j in marked:      # parallel: deletions take effect after the whole sub-iteration
                img[i, j] = 0
            changed |= bool(marked)
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def random_blobs(n, seed):
    """bool [n, 24, 30]: thresholded bicubic-upsampled noise, blobs and strokes 2-8 px thick, some on the border."""
    rng = np.random.default_rng(seed)
    noise = (rng.random((n, 6, 8)) * 255).astype(np.uint8)
    return np.stack([cv2.resize(z, (30, 24), interpolation=cv2.INTER_CUBIC) > 128 for z in noise])


# -- Zhang–Suen thinning -------------------------------------------------------------------------------------------

def test_bar_thins_to_its_middle_row():
    """3 × 9 bar, rows 1-3, columns 1-9. Sub-iteration 1 deletes south / east boundary points and the north-west
    corner (P4 = 0, P6 = 0, or P2 = P8 = 0, with 2 <= B <= 6 and A = 1): all of row 3, both top corners, and the
    right end (2, 9); the left end (2, 1) stays (P2·P4·P6 = 1). Sub-iteration 2 deletes north / west boundary points
    and the south-east corner: row 1 columns 2-8 (P2 = 0, B = 3..5, A = 1), (2, 1) (P8 = 0, B = 2: NE and E) and
    (2, 8) (P4 = P6 = 0, B = 3, A = 1). Left: row 2, columns 2-7, a 1-px line, which no rule changes (its ends have
    B = 1, its inner pixels A = 2)."""
    bar = grid("""...........
                  .#########.
                  .#########.
                  .#########.
                  ...........""")
    skeleton = grid("""...........
                       ...........
                       ..######...
                       ...........
                       ...........""")
    np.testing.assert_array_equal(morpho.skeletonize(bar[None])[0], skeleton)


def test_square_thins_to_its_centre():
    """5 × 5 square, rows and columns 1-5. Iteration 1: sub-iteration 1 deletes row 5, column 5 and corner (1, 1);
    sub-iteration 2 deletes the rest of row 1 and column 1 (north / west boundary, B = 3..5, A = 1) and the new
    south-east corner (4, 4) (P4 = P6 = 0, B = 3). Left: the 3 × 3 block (2-4, 2-4) less (4, 4). Iteration 2,
    sub-iteration 1 deletes (2, 2) (north-west corner), (2, 4), (3, 4) (P4 = 0) and (4, 2), (4, 3) (P6 = 0), keeping
    (2, 3) (P4·P6·P8 = 1) and (3, 2) (P2·P4·P6 = 1); sub-iteration 2 deletes (2, 3) (P2 = 0, B = 2) and (3, 2)
    (P8 = 0, B = 2) but keeps (3, 3), whose neighbours N and W give A = 2. The single centre pixel stays (B = 0)."""
    square = np.zeros((7, 7), dtype=bool)
    square[1:6, 1:6] = True
    expected = np.zeros((7, 7), dtype=bool)
    expected[3, 3] = True
    np.testing.assert_array_equal(morpho.skeletonize(square[None])[0], expected)


def test_one_pixel_lines_single_pixels_and_empty_images_are_unchanged():
    """A 1-px line (straight, diagonal, bent) has B = 1 at its ends and A = 2 inside: nothing is deletable. A lone
    pixel has B = 0. An empty image has nothing to delete."""
    masks = np.stack([grid("""........
                              .######.
                              ........
                              ........
                              ........"""),
                      grid("""........
                              .#......
                              ..#.....
                              ...####.
                              ........"""),
                      grid("""........
                              ........
                              ....#...
                              ........
                              ........"""),
                      np.zeros((5, 8), dtype=bool)])
    np.testing.assert_array_equal(morpho.skeletonize(masks), masks)


def test_two_by_two_block_vanishes():
    """Zhang–Suen's known flaw (kept, see morpho.skeletonize): each pixel of a 2 × 2 block has B = 3, A = 1, and
    in sub-iteration 1 P2·P4·P6 = P4·P6·P8 = 0 for all four (each lacks an east or a south neighbour, or both the
    north and the west one), so all four are deleted at once."""
    block = np.zeros((4, 4), dtype=bool)
    block[1:3, 1:3] = True
    assert not morpho.skeletonize(block[None]).any()


def test_batch_matches_the_pixel_loop_oracle_image_by_image():
    """Vectorised, batched thinning equals the paper's rules applied pixel by pixel to each image alone, and the
    skeleton is a subset of the input; a border-touching stroke treats outside as background in both."""
    masks = random_blobs(6, seed=0)
    skeleton = morpho.skeletonize(masks)
    for mask, skel in zip(masks, skeleton):
        np.testing.assert_array_equal(skel, zhang_suen_loops(mask))
        np.testing.assert_array_equal(skel, morpho.skeletonize(mask[None])[0])
    assert not (skeleton & ~masks).any()
    assert skeleton.sum() < masks.sum() / 2


# -- stroke thickness of strokes of known width --------------------------------------------------------------------

# Errors observed, over these widths and PHASES: 30° and 60° lines at most 0.14 px, rings 0.14 px (0.20 and 0.17
# over 32 random positions each); their mean over all of them is +0.00 px (with the other convention, − 1/2 before
# doubling, −0.25 px). 45°: at most 0.33 px. 0° / 90°: 0 or +0.5 px, up to 0.04 px more or less.
GENERAL_TOLERANCE = 0.25


@pytest.mark.parametrize("shape", [30, 60, "ring"])
def test_known_width_at_general_angles(shape):
    """A stroke at an angle off the pixel grid, or a ring (all angles, no ends), measures its width within 0.25 px
    at every sub-pixel position."""
    for width in WIDTHS:
        error = morpho.stroke_thickness(strokes(shape, width)) - width
        assert np.abs(error).max() <= GENERAL_TOLERANCE, (shape, width, error)


def test_pixel_convention_has_no_systematic_offset():
    """Distances to the nearest background pixel's centre, doubled, measure width without bias: the mean error
    over lines at 30° and 60° and rings of every width is within 0.1 px of 0, where the half-pixel convention
    (distance − 1/2) would be 1/SCALE = 0.25 px too thin."""
    errors = [morpho.stroke_thickness(strokes(shape, width)) - width for shape in (30, 60, "ring") for width in WIDTHS]
    assert abs(np.mean(errors)) <= 0.1


@pytest.mark.parametrize("angle", [0, 90])
def test_known_width_along_the_pixel_grid(angle):
    """A horizontal or vertical stroke's skeleton lies on one pixel row of the upsampled image: its distance to the
    background is a whole number of upsampled pixels, ceil(W / 2) for a binarised width of W pixels, so the measure
    is 2·ceil(W / 2) / SCALE: the width w (4w upsampled pixels) or, where its sub-pixel position binarises it one
    pixel wider, w + 2/SCALE = w + 0.5. Both occur among the eight positions. The few skeleton pixels at the flat
    ends move it by up to 0.04 px (allowed: 0.05)."""
    for width in WIDTHS:
        error = morpho.stroke_thickness(strokes(angle, width)) - width
        exact = np.abs(error) <= 0.05
        one_step_thicker = np.abs(error - 2 / morpho.SCALE) <= 0.05
        assert (exact | one_step_thicker).all(), (angle, width, error)
        assert exact.any() and one_step_thicker.any(), (angle, width, error)


def test_known_width_at_45_degrees():
    """At exactly 45° the pixel grid's diagonal steps quantise the distances too: within 0.35 px. (At some other
    positions than these eight, Zhang–Suen erodes an exactly-45° stroke's perfect staircase to a few pixels, its
    known flaw: 1 in 32 random positions of a 5 px stroke measured 3.9 px. None did at 44° or 46°.)"""
    for width in WIDTHS:
        error = morpho.stroke_thickness(strokes(45, width)) - width
        assert np.abs(error).max() <= 0.35, (width, error)


def test_thicker_strokes_measure_thicker():
    """The same ring and the same 30° line drawn 0.5 px thicker each time measure strictly thicker."""
    widths = np.arange(1.5, 5.01, 0.5)
    for draw in (lambda w: ring(w, (13.7, 14.2)), lambda w: line(w, 30, (14.2, 13.9))):
        measured = morpho.stroke_thickness(np.stack([draw(w) for w in widths]))
        assert (np.diff(measured) > 0).all(), measured


def test_translation_by_whole_pixels_keeps_the_measure():
    """Moving a digit by whole pixels moves its upsampled mask and its skeleton by whole upsampled pixels: the
    measure does not change (allowed: 0.05 px)."""
    image = ring(3.0, (13.3, 14.6), radius=6.0)
    moved = np.stack([image] + [np.roll(image, shift, axis=(0, 1)) for shift in [(3, 0), (0, -4), (-2, 3)]])
    measured = morpho.stroke_thickness(moved)
    assert np.abs(measured - measured[0]).max() < 0.05


def test_outside_the_image_is_background():
    """A white image is one stroke as wide as the image: its 112 × 112 mask thins to the pixel (55, 55), 56 pixels
    from the first background row outside, so 2 · 56 / 4 = 28 px. Bands 6 px wide along the left and the top edge
    measure 6 px: the background beyond the edge bounds them (cv2.distanceTransform alone counts outside as
    stroke, which would measure them 12 px)."""
    white = np.full((SIDE, SIDE), 255, np.uint8)
    left, top = np.zeros((2, SIDE, SIDE), np.uint8)
    left[:, :6] = 255
    top[:6, :] = 255
    np.testing.assert_allclose(morpho.stroke_thickness(np.stack([white, left, top])), [28.0, 6.0, 6.0], atol=0.05)


def test_other_scales_measure_in_input_pixels():
    """Upsampling 2 or 8 times instead of 4 still reports input pixels: rings and 30° lines within 0.3 px (seen:
    0.26 at both), mean error within 0.1 px (seen: +0.07 at 2, −0.03 at 8)."""
    for scale in (2, 8):
        errors = np.concatenate([morpho.stroke_thickness(strokes(shape, width), scale=scale) - width
                                 for shape in (30, "ring") for width in WIDTHS])
        assert np.abs(errors).max() <= 0.3 and abs(errors.mean()) <= 0.1, (scale, errors)


def test_channel_axis_empty_images_and_chunks(monkeypatch):
    """[N, H, W] and [N, H, W, 1] measure the same; an image without a stroke pixel is NaN; measuring in chunks of
    3 gives what one chunk gives."""
    images = np.stack([ring(2.0, (14.0, 14.0)), np.zeros((SIDE, SIDE), np.uint8), line(3.0, 30, (14.0, 14.0)),
                       ring(4.0, (13.6, 14.1)), line(1.5, 60, (14.3, 13.8)), np.zeros((SIDE, SIDE), np.uint8),
                       ring(5.0, (14.2, 14.4), radius=8.0)])
    whole = morpho.stroke_thickness(images)
    assert whole.dtype == np.float64 and whole.shape == (7,)
    np.testing.assert_array_equal(np.isnan(whole), [False, True, False, False, False, True, False])
    np.testing.assert_array_equal(morpho.stroke_thickness(images[..., None]), whole)
    monkeypatch.setattr(morpho, "CHUNK", 3)
    np.testing.assert_allclose(morpho.stroke_thickness(images), whole, rtol=1e-6)   # float32 distances


def test_binarise_upsamples_and_thresholds_strictly():
    """A uniform image stays uniform under bicubic upsampling: 129 is stroke, 128 (the threshold) is not."""
    images = np.stack([np.full((5, 7), 129, np.uint8), np.full((5, 7), 128, np.uint8)])
    masks = morpho.binarise(images)
    assert masks.dtype == bool and masks.shape == (2, 20, 28)
    assert masks[0].all() and not masks[1].any()


@pytest.mark.parametrize("images,message", [
    (np.zeros((2, 28, 28), np.float32), "must be uint8"),
    (np.zeros((2, 28, 28), np.int64), "must be uint8"),
    (np.zeros((2, 28, 28, 3), np.uint8), "one-channel"),
    (np.zeros((28, 28), np.uint8), "one-channel"),
    (np.zeros((2, 0, 28), np.uint8), "one-channel"),
])
def test_bad_images_raise_one_line(images, message):
    with pytest.raises(ValueError, match=message) as caught:
        morpho.stroke_thickness(images)
    assert isinstance(caught.value, InputError) and "\n" not in str(caught.value)


def test_bad_scale_and_mask_shape_raise():
    with pytest.raises(InputError, match="whole number"):
        morpho.binarise(np.zeros((1, 28, 28), np.uint8), scale=0)
    with pytest.raises(InputError, match=r"\[N, H, W\]"):
        morpho.skeletonize(np.zeros((28, 28), bool))
