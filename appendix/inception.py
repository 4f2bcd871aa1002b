"""The FID Inception v3: 2048-d pool3 features of the TensorFlow graph that defines the standard FID [FID].

[FID] Heusel et al. 2017 compute the Fréchet distance on the pool_3 features of the TF Inception graph
`inception-2015-12-05` (Szegedy et al. 2016, "Rethinking the Inception Architecture"). pytorch-fid ships that
graph's weights as a PyTorch state_dict, `pt_inception-2015-12-05-6726825d.pth`; `FIDInceptionV3` is our own
network whose state_dict keys and shapes are exactly that file's, so the real file loads with
`load_state_dict(strict=True)`. Nothing is downloaded: the user passes the file (`sample.py --inception-weights`).

The graph differs from the ImageNet Inception v3 of torchvision in three places, which decide the numbers:
  - the 3×3 average pools inside Mixed_5b-d, Mixed_6b-e and Mixed_7b divide by the number of *valid* inputs at
    the border (TF 'SAME' pooling, `count_include_pad=False`), not by 9;
  - Mixed_7c pools its fourth path with a 3×3 *max* pool (stride 1), where the other modules average;
  - the classifier has 1008 outputs (`fc`, unused for FID; it is in the file, so it is here).
Input (`preprocess`): uint8 RGB -> [0, 1] -> bilinear resize to 299×299 (align_corners=False, no antialiasing)
-> [-1, 1], the order pytorch-fid applies. Output: the global average of Mixed_7c, [N, 2048]. (The TF graph
resizes inside itself with TF1's legacy bilinear, which samples at dst · in/out rather than pytorch-fid's half-pixel
centres: FIDs of 64×64 images from TF evaluators differ a little from pytorch-fid's and ours.)
Layer names follow the TF graph as torchvision spells them (Conv2d_1a_3x3 ... Mixed_7c, branch3x3dbl_2, ...);
each convolution is `conv` (no bias) + `bn` (BatchNorm, eps 0.001) + ReLU.
"""
import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import InputError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"        # torch.hub's naming: the file name carries its sha256 prefix
INPUT_SIZE = 299
FEATURES = 2048


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, the TF graph's) -> ReLU. padding None: 'same' for stride 1 (k // 2 on
    each side), none ('valid') for stride 2, the paddings of every Mixed module."""

    def __init__(self, cin, cout, kernel, stride=1, padding=None):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if padding is None:
            padding = (kh // 2, kw // 2) if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, (kh, kw), stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3×3 average, stride 1, 'SAME': each output divides by the number of inputs inside the image (TF)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool_same(x):
    """3×3 max, stride 1, 'SAME' (the pool path of Mixed_7c)."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def max_pool_reduce(x):
    """3×3 max, stride 2, 'VALID': halves the resolution (the stem and Mixed_6a / 7a)."""
    return F.max_pool2d(x, 3, stride=2)


class Mixed(nn.Module):
    """An Inception module: parallel paths whose outputs are concatenated on channels, in the order given.

    convs: {name: ConvBN}, registered under those names (the state_dict keys). paths: one list per path of stages
    applied in turn: a conv name, a tuple of conv names (applied to the same input, outputs concatenated: the
    1×3 / 3×1 split of Mixed_7b-c), or a pooling function.
    """

    def __init__(self, convs, paths):
        super().__init__()
        for name, layer in convs.items():
            self.add_module(name, layer)
        self.paths = paths

    def run(self, stage, h):
        if callable(stage):
            return stage(h)
        if isinstance(stage, tuple):
            return torch.cat([getattr(self, name)(h) for name in stage], dim=1)
        return getattr(self, stage)(h)

    def forward(self, x):
        outputs = []
        for path in self.paths:
            h = x
            for stage in path:
                h = self.run(stage, h)
            outputs.append(h)
        return torch.cat(outputs, dim=1)


def mixed_35(cin, pool_channels):
    """Mixed_5b-d at 35×35: 1×1 | 1×1, 5×5 | 1×1, 3×3, 3×3 | avg pool, 1×1 -> 64 + 64 + 96 + pool_channels."""
    return Mixed(dict(branch1x1=ConvBN(cin, 64, 1),
                      branch5x5_1=ConvBN(cin, 48, 1), branch5x5_2=ConvBN(48, 64, 5),
                      branch3x3dbl_1=ConvBN(cin, 64, 1), branch3x3dbl_2=ConvBN(64, 96, 3),
                      branch3x3dbl_3=ConvBN(96, 96, 3),
                      branch_pool=ConvBN(cin, pool_channels, 1)),
                 [["branch1x1"], ["branch5x5_1", "branch5x5_2"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
                  [tf_avg_pool, "branch_pool"]])


def reduce_35_to_17(cin):
    """Mixed_6a, 35 -> 17: 3×3/2 | 1×1, 3×3, 3×3/2 | max pool/2 -> 384 + 96 + cin channels."""
    return Mixed(dict(branch3x3=ConvBN(cin, 384, 3, stride=2),
                      branch3x3dbl_1=ConvBN(cin, 64, 1), branch3x3dbl_2=ConvBN(64, 96, 3),
                      branch3x3dbl_3=ConvBN(96, 96, 3, stride=2)),
                 [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], [max_pool_reduce]])


def mixed_17(cin, c7):
    """Mixed_6b-e at 17×17, 7×7 factorised into 1×7 and 7×1 with c7 inner channels -> 4 × 192 channels."""
    return Mixed(dict(branch1x1=ConvBN(cin, 192, 1),
                      branch7x7_1=ConvBN(cin, c7, 1), branch7x7_2=ConvBN(c7, c7, (1, 7)),
                      branch7x7_3=ConvBN(c7, 192, (7, 1)),
                      branch7x7dbl_1=ConvBN(cin, c7, 1), branch7x7dbl_2=ConvBN(c7, c7, (7, 1)),
                      branch7x7dbl_3=ConvBN(c7, c7, (1, 7)), branch7x7dbl_4=ConvBN(c7, c7, (7, 1)),
                      branch7x7dbl_5=ConvBN(c7, 192, (1, 7)),
                      branch_pool=ConvBN(cin, 192, 1)),
                 [["branch1x1"], ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
                  ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"],
                  [tf_avg_pool, "branch_pool"]])


def reduce_17_to_8(cin):
    """Mixed_7a, 17 -> 8: 1×1, 3×3/2 | 1×1, 1×7, 7×1, 3×3/2 | max pool/2 -> 320 + 192 + cin channels."""
    return Mixed(dict(branch3x3_1=ConvBN(cin, 192, 1), branch3x3_2=ConvBN(192, 320, 3, stride=2),
                      branch7x7x3_1=ConvBN(cin, 192, 1), branch7x7x3_2=ConvBN(192, 192, (1, 7)),
                      branch7x7x3_3=ConvBN(192, 192, (7, 1)), branch7x7x3_4=ConvBN(192, 192, 3, stride=2)),
                 [["branch3x3_1", "branch3x3_2"], ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
                  [max_pool_reduce]])


def mixed_8(cin, pool):
    """Mixed_7b-c at 8×8, the 3×3s split into parallel 1×3 and 3×1 -> 320 + 768 + 768 + 192 = 2048 channels;
    `pool` is tf_avg_pool (7b) or max_pool_same (7c, the TF graph's)."""
    return Mixed(dict(branch1x1=ConvBN(cin, 320, 1),
                      branch3x3_1=ConvBN(cin, 384, 1), branch3x3_2a=ConvBN(384, 384, (1, 3)),
                      branch3x3_2b=ConvBN(384, 384, (3, 1)),
                      branch3x3dbl_1=ConvBN(cin, 448, 1), branch3x3dbl_2=ConvBN(448, 384, 3),
                      branch3x3dbl_3a=ConvBN(384, 384, (1, 3)), branch3x3dbl_3b=ConvBN(384, 384, (3, 1)),
                      branch_pool=ConvBN(cin, 192, 1)),
                 [["branch1x1"], ["branch3x3_1", ("branch3x3_2a", "branch3x3_2b")],
                  ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")],
                  [pool, "branch_pool"]])


class FIDInceptionV3(nn.Module):
    """The FID Inception v3 up to pool3 (the 1008-way `fc` is kept for the weight file, not applied).

    forward(x): x float [N, 3, 299, 299] in [-1, 1] -> pool3 features [N, 2048]. Random init (He normal for the
    convolutions, BatchNorm at the identity) stands in for the weights in tests: a random projection that keeps
    the activations' scale through the 94 convolutions.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)            # 299 -> 149
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, padding=0)          # -> 147
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3)                     # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, padding=0)         # -> 71, then max pool -> 35
        self.Mixed_5b = mixed_35(192, 32)                          # -> 256 channels
        self.Mixed_5c = mixed_35(256, 64)                          # -> 288
        self.Mixed_5d = mixed_35(288, 64)                          # -> 288
        self.Mixed_6a = reduce_35_to_17(288)                       # -> 768 at 17×17
        self.Mixed_6b = mixed_17(768, 128)
        self.Mixed_6c = mixed_17(768, 160)
        self.Mixed_6d = mixed_17(768, 160)
        self.Mixed_6e = mixed_17(768, 192)
        self.Mixed_7a = reduce_17_to_8(768)                        # -> 1280 at 8×8
        self.Mixed_7b = mixed_8(1280, tf_avg_pool)                 # -> 2048
        self.Mixed_7c = mixed_8(2048, max_pool_same)               # -> 2048
        self.fc = nn.Linear(FEATURES, 1008)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool_reduce(x)))
        x = max_pool_reduce(x)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))                                   # pool3: [N, 2048]


def preprocess(images_u8):
    """uint8 [N, H, W, 3] (numpy or tensor) -> float [N, 3, 299, 299] in [-1, 1]: u8 / 255, bilinear resize
    (align_corners=False, no antialiasing), then 2x - 1, as pytorch-fid. Grayscale [N, H, W, 1] is repeated to
    three equal channels, as pytorch-fid's PIL loading converts it to RGB."""
    x = torch.as_tensor(images_u8).permute(0, 3, 1, 2).float() / 255
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def inception_features(net, images_u8, device="cpu", batch_size=100):
    """Pool3 features float64 [N, 2048] (numpy) of uint8 images [N, H, W, 3], in batches, fp32."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch_size):
            out.append(net(preprocess(images_u8[i:i + batch_size]).to(device)).double().cpu())
    return torch.cat(out).numpy() if out else torch.zeros(0, FEATURES, dtype=torch.float64).numpy()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fid_inception(path, device="cpu"):
    """(FIDInceptionV3 in eval mode on `device`, a one-line description of the extractor) from a weight file.

    The file is read with torch.load(weights_only=True) and loaded with load_state_dict(strict=True). Raises
    InputError (one line) when the file is missing, not a state_dict, or its keys / shapes are not the FID
    Inception's. The description says whether the file's sha256 starts with the 6726825d of pytorch-fid's name
    (the standard FID) or not (features of other weights: not comparable with published FIDs).
    """
    path = Path(path)
    hint = f"pass pytorch-fid's {WEIGHTS_FILE} (the FID Inception v3)"
    if not path.is_file():
        raise InputError(f"--inception-weights {path} not found; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle, zip and torch errors all mean: not a weights-only state_dict
        raise InputError(f"--inception-weights {path} is not a readable state_dict ({type(e).__name__}); {hint}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"--inception-weights {path} is not a state_dict of tensors; {hint}")
    net = FIDInceptionV3()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise InputError(f"--inception-weights {path} does not fit the FID Inception v3: {len(missing)} keys missing "
                         f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, {len(shapes)} of another "
                         f"shape {shapes[:2]}; {hint}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"--inception-weights {path}: {str(e).splitlines()[-1].strip()}; {hint}")
    digest = sha256_of(path)
    standard = digest.startswith(WEIGHTS_SHA256_PREFIX)
    description = (f"FID Inception v3 pool3 (2048-d; {INPUT_SIZE}x{INPUT_SIZE} bilinear, [-1, 1]), weights {path.name} "
                   f"sha256 {digest[:8]}: " + ("the standard FID (pytorch-fid's file)" if standard else
                                               "NOT pytorch-fid's file, numbers not comparable with published FIDs"))
    return net.to(device).eval(), description
