"""Demo models of the real SyncTalk_2D architecture and cost, with weights designed by hand.

The audio encoder is the 13-block Wav2Lip encoder (2.81 M parameters, 93 M multiply-adds per
window) and the generator is UNet-328 (12.15 M parameters after BatchNorm folding, 4.886 G
multiply-adds per frame), both with BatchNorm folded into the convolutions as an ONNX export does.
Every channel computes, so ONNX Runtime spends what it spends on a trained model. A few channels
carry a designed signal; the rest carry random "filler" weights that never feed the signal.

How the mouth follows the audio:

1. The encoder turns the window's mean log-mel level into a loudness ``u`` in [0, 1] (0 in silence)
   and writes ``u * T`` into embedding dims 0..255, where ``T`` is a mouth-shaped bump on a 16x16
   grid. The ``[16, 512] -> [32, 16, 16]`` reshape of the UNet's audio input turns those dims back
   into 16x16 positions: the embedding layout carries the position.
2. The UNet's audio branch averages three neighbouring frames' maps and carries the result to the
   10x10 bottleneck; the up path's bilinear upsamplings and depthwise blurs spread it to a smooth
   blob ``b`` over the 320x320 ROI, peaking at the mouth.
3. The ROI pixels ``p`` travel from the visual input through ``inc`` and the top skip connection.
   The last block computes ``logit(p)`` piecewise-linearly with ReLUs, so the sigmoid returns the
   pixel, and a ReLU gate replaces it with a dark mouth colour where ``b`` is above a threshold:
   the mouth opens with loudness and closes in silence, everything else stays the face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from lipfarm.demo.graph import GraphWriter, Tensor

SEED = 20_26_11_24

# Where the mouth sits in the ROI, as fractions of its side (measured on real SyncTalk_2D crops,
# whose rule puts the nose bridge at the top edge and the chin near the bottom).
MOUTH_CENTER = (0.49, 0.41)  # (x, y)
MOUTH_SIGMA = (2.0, 0.6)  # bump widths on the 16x16 grid (x, y): a wide, short opening
# Loudness: u = clamp(LOUDNESS_GAIN * (level - LOUDNESS_FLOOR), 0, 1), where level is the encoder's
# weighted mean of (mel + 4) over its window: about 0.1 in pauses, 1 to 2.3 in speech.
LOUDNESS_FLOOR = 0.35
LOUDNESS_GAIN = 0.85
MOUTH_THRESHOLD = 0.6  # fraction of the blob peak above which the mouth is open (u > 0.6)
MOUTH_EDGE = 0.05  # blob range over which the opening fades in (an anti-aliased edge)
MOUTH_COLOUR_BGR = (0.10, 0.07, 0.22)  # a dark mouth interior
LOGIT_KNOTS = 40  # hidden units per colour channel for the logit (3 x 39 + 2 gate units <= 128)


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    multiply_adds: int


class _Weights:
    """Random filler weights with designed signal rows written over them.

    ``signal`` maps an output channel to ``({input channel: kernel or centre-tap scalar}, bias)``.
    A signal row reads only what it names; filler rows read everything.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def conv(self, cout: int, cin: int, k: int, *, gain: float, signal=None, depthwise=False):
        cin_g = 1 if depthwise else cin
        w = self.rng.normal(0.0, gain / np.sqrt(cin_g * k * k), (cout, cin_g, k, k)).astype(np.float32)
        b = self.rng.normal(0.0, 0.02, cout).astype(np.float32)
        for out, (inputs, bias) in (signal or {}).items():
            w[out] = 0.0
            b[out] = bias
            for index, value in inputs.items():
                kernel = np.asarray(value, np.float32)
                if kernel.ndim == 0:
                    kernel = np.pad(kernel.reshape(1, 1), (k - 1) // 2) if k > 1 else kernel.reshape(1, 1)
                w[out, 0 if depthwise else index] = kernel
        return w, b


def _centre(k: int = 3) -> np.ndarray:
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, k // 2] = 1.0
    return kernel


_BLUR = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16.0


def _carry(pairs: dict[int, int]) -> dict:
    """Signal rows that copy input channel ``i`` to output channel ``o`` for ``{o: i}``."""
    return {o: ({i: 1.0}, 0.0) for o, i in pairs.items()}


def _dw(kernels: dict[int, np.ndarray]) -> dict:
    return {c: ({c: kernel}, 0.0) for c, kernel in kernels.items()}


class _Net:
    """Builds blocks of the SyncTalk_2D architecture into a ``GraphWriter``."""

    def __init__(self, seed: int) -> None:
        self.g = GraphWriter()
        self.w = _Weights(seed)

    def conv(self, x: Tensor, cout: int, k: int, *, stride=(1, 1), padding=0, relu=True,
             gain=None, signal=None) -> Tensor:
        gain = gain if gain is not None else (1.4 if relu else 1.0)
        w, b = self.w.conv(cout, x.channels, k, gain=gain, signal=signal)
        y = self.g.conv(x, w, b, stride=stride, padding=padding)
        return self.g.relu(y) if relu else y

    def inverted_residual(self, x: Tensor, cout: int, *, stride=1, residual=False,
                          pw1=None, dw=None, pw2=None) -> Tensor:
        """MobileNetV2 block, expansion 2, BatchNorm folded: 1x1+ReLU, dw3x3+ReLU, 1x1 (+x)."""
        hidden = 2 * x.channels
        w, b = self.w.conv(hidden, x.channels, 1, gain=1.4, signal=pw1)
        y = self.g.relu(self.g.conv(x, w, b))
        w, b = self.w.conv(hidden, hidden, 3, gain=1.4, signal=dw, depthwise=True)
        y = self.g.relu(self.g.conv(y, w, b, stride=(stride, stride), padding=1, groups=hidden))
        w, b = self.w.conv(cout, hidden, 1, gain=0.5 if residual else 1.0, signal=pw2)
        y = self.g.conv(y, w, b)
        return self.g.add(x, y) if residual else y

    def double_conv(self, x: Tensor, cout: int, *, stride=1, carry=None, dw_kernel=None) -> Tensor:
        """DoubleConvDW; ``carry`` = (input channel, output channel) of a signal to pass through."""
        if carry is None:
            y = self.inverted_residual(x, cout, stride=stride)
            return self.inverted_residual(y, cout, residual=True)
        src, dst = carry
        kernel = _centre() if dw_kernel is None else dw_kernel
        y = self.inverted_residual(x, cout, stride=stride, pw1=_carry({0: src}), dw=_dw({0: kernel}),
                                   pw2=_carry({dst: 0}))
        return self.inverted_residual(y, cout, residual=True, pw2={dst: ({}, 0.0)})


# --------------------------------------------------------------------------------------------------
# The audio encoder
# --------------------------------------------------------------------------------------------------

def mouth_template(grid: int = 16) -> np.ndarray:
    """The mouth bump ``T`` on the audio input's 16x16 grid, peak 1 (float32 ``[16, 16]``).

    Grid position ``h`` maps to ROI row ``(h + 2) / 2 * roi / 9`` through the audio branch's stride-2
    convolution (padding 3) and the align-corners upsamplings, hence the offsets below.
    """
    cx = MOUTH_CENTER[0] * 18.0 - 2.0
    cy = MOUTH_CENTER[1] * 18.0 - 2.0
    h, w = np.mgrid[0:grid, 0:grid].astype(np.float64)
    bump = np.exp(-((w - cx) ** 2) / (2 * MOUTH_SIGMA[0] ** 2) - ((h - cy) ** 2) / (2 * MOUTH_SIGMA[1] ** 2))
    bump[bump < 1e-3] = 0.0  # no far tails: they would only carry vanishing numbers through the net
    return bump.astype(np.float32)


def build_encoder(seed: int = SEED) -> tuple[onnx.ModelProto, ModelCost]:
    """The Wav2Lip audio encoder, ``mel [B, 1, 80, 16] -> emb [B, 512]``, with demo weights."""
    net = _Net(seed)
    x = net.g.input("mel", 1, 80, 16)
    mean9 = np.full((3, 3), 1.0 / 9.0, np.float32)
    keep = {0: ({}, 0.0)}  # residual blocks: the signal row adds nothing, ReLU(x) = x
    x = net.conv(x, 32, 3, padding=1, signal={0: ({0: 1.0}, 4.0)})  # level = mel + 4 >= 0
    for _ in range(2):
        x = _residual_conv(net, x, keep)
    x = net.conv(x, 64, 3, stride=(3, 1), padding=1, signal={0: ({0: mean9}, 0.0)})
    for _ in range(2):
        x = _residual_conv(net, x, keep)
    x = net.conv(x, 128, 3, stride=(3, 3), padding=1, signal={0: ({0: mean9}, 0.0)})
    for _ in range(2):
        x = _residual_conv(net, x, keep)
    x = net.conv(x, 256, 3, stride=(3, 2), padding=1, signal={0: ({0: mean9}, 0.0)})
    x = _residual_conv(net, x, keep)
    gain, floor = LOUDNESS_GAIN, LOUDNESS_FLOOR
    loud = {0: ({0: mean9 * gain}, -gain * floor), 1: ({0: mean9 * gain}, -gain * floor - 1.0)}
    x = net.conv(x, 512, 3, signal=loud)  # 3x3 -> 1x1; u = relu(ch0) - relu(ch1) in [0, 1]
    template = mouth_template().reshape(-1)
    emb = {d: ({0: float(t), 1: -float(t)}, 0.0) for d, t in enumerate(template)}
    x = net.conv(x, 512, 1, signal=emb, gain=1.0)
    net.g.output(x, "emb", flatten=True)
    return net.g.model("lipfarm_demo_audio_encoder"), ModelCost(net.g.parameters, net.g.multiply_adds)


def _residual_conv(net: _Net, x: Tensor, signal: dict) -> Tensor:
    """Wav2Lip's residual Conv2d: ReLU(conv(x) + x)."""
    w, b = net.w.conv(x.channels, x.channels, 3, gain=0.5, signal=signal)
    return net.g.relu(net.g.add(net.g.conv(x, w, b, padding=1), x))


# --------------------------------------------------------------------------------------------------
# The UNet generator
# --------------------------------------------------------------------------------------------------

# Per ROI size: channels after inc and each downsampling, and each up block's output channels.
_LAYOUTS = {
    320: ((32, 32, 64, 128, 256, 512), (128, 64, 32, 32, 16)),
    160: ((32, 64, 128, 256, 512), (128, 64, 32, 16)),
}
# Audio input channels averaged into the mouth map: frames i-2, i-1, i (rows 6, 7, 8 of 16),
# first halves (dims 0..255). Row 7 is the window centred on frame i.
_AUDIO_TAPS = {12: 0.25, 14: 0.5, 16: 0.25}


@dataclass(frozen=True)
class LogitFit:
    """``z(p) = offset + linear p + sum(left_slopes relu(left - p)) + sum(right_slopes relu(p - right))``.

    Hinges open outwards from the middle: a mid-grey pixel activates none of the steep ones, so no
    large terms cancel, which keeps the fit exact when weights and activations are rounded to bf16.
    """

    left: np.ndarray
    left_slopes: np.ndarray
    right: np.ndarray
    right_slopes: np.ndarray
    linear: float
    offset: float

    @property
    def units(self) -> int:
        return 1 + len(self.left) + len(self.right)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return (self.offset + self.linear * p
                + np.maximum(self.left[None] - p[:, None], 0) @ self.left_slopes
                + np.maximum(p[:, None] - self.right[None], 0) @ self.right_slopes)


def logit_fit(hinges_per_side: int = LOGIT_KNOTS // 2 - 1) -> LogitFit:
    """A piecewise-linear ``z(p)`` with ``uint8(sigmoid(z) * 255) = 255 p`` for every uint8 ``p``.

    Fitted on the 256 values a uint8 pixel / 255 can take, weighted so errors count equally after
    the sigmoid; hinges are denser near 0 and 1, where the logit is steep.
    """
    levels = np.arange(256) / 255.0
    target = np.clip((np.arange(256) + 0.5) / 255.0, 1e-6, 1 - 1e-6)
    z = np.log(target / (1 - target))
    z[-1] = 18.0  # sigmoid must reach 1.0 exactly for a white pixel
    u = np.linspace(0.0, 1.0, hinges_per_side + 1)[1:]
    left = np.clip(0.5 * (1 - np.cos(np.pi * u / 2)), 0.5 / 255, 0.499)
    right = np.r_[1 - left[::-1][:-1], 254.5 / 255]
    basis = np.c_[np.ones(256), levels, np.maximum(left[None] - levels[:, None], 0),
                  np.maximum(levels[:, None] - right[None], 0)]
    weight = np.sqrt(target * (1 - target)) + 1e-3
    coef, *_ = np.linalg.lstsq(basis * weight[:, None], z * weight, rcond=None)
    n = len(left)
    return LogitFit(left.astype(np.float32), coef[2:2 + n].astype(np.float32), right.astype(np.float32),
                    coef[2 + n:].astype(np.float32), float(coef[1]), float(coef[0]))


def build_generator(roi_px: int = 320, seed: int = SEED + 1) -> tuple[onnx.ModelProto, ModelCost]:
    """UNet-328 (or its 160 sibling) with demo weights: ``input, audio -> output``."""
    return _generator(roi_px, seed, blob_peak=measure_blob_peak(roi_px, seed))


def measure_blob_peak(roi_px: int = 320, seed: int = SEED + 1) -> float:
    """Peak of the mouth blob at full loudness, read from the built network itself.

    The path from the audio input to the blob is linear on non-negative values, so one run of a
    probe build (which also outputs the blob) with the template at loudness 1 gives its gain.
    """
    import onnxruntime as ort

    model, _ = _generator(roi_px, seed, blob_peak=1.0, probe_blob=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    audio = np.zeros((1, 32, 16, 16), np.float32)
    for channel in _AUDIO_TAPS:
        audio[0, channel] = mouth_template()
    visual = np.zeros((1, 6, roi_px, roi_px), np.float32)
    blob = session.run(["blob"], {"input": visual, "audio": audio})[0]
    return float(blob[0, 0].max())


def _generator(roi_px: int, seed: int, *, blob_peak: float, probe_blob: bool = False):
    downs, ups = _LAYOUTS[roi_px]
    net = _Net(seed)
    x = net.g.input("input", 6, roi_px, roi_px)
    audio = net.g.input("audio", 32, 16, 16)
    skips = [net.inverted_residual(x, downs[0], pw1=_carry({0: 0, 1: 1, 2: 2}),
                                   dw=_dw({c: _centre() for c in range(3)}),
                                   pw2=_carry({0: 0, 1: 1, 2: 2}))]
    for width in downs[1:]:
        skips.append(net.double_conv(skips[-1], width, stride=2))
    y = net.g.concat([skips.pop(), _audio_branch(net, audio)])
    y = net.double_conv(y, 512, carry=(512, 0))
    y = net.double_conv(y, 256, carry=(0, 0))
    for width in ups[:-1]:
        y = net.double_conv(net.g.concat([net.g.upsample2x(y), skips.pop()]), width,
                            carry=(0, 0), dw_kernel=_BLUR)
    joined = net.g.concat([net.g.upsample2x(y), skips.pop()])
    if probe_blob:
        net.g.output(joined, "blob")
    y = _mouth_and_face(net, joined, ups[-1], face_channels=joined.channels - downs[0],
                        blob_peak=blob_peak)
    w, b = net.w.conv(3, y.channels, 1, gain=1.0, signal=_carry({0: 0, 1: 1, 2: 2}))
    net.g.output(net.g.sigmoid(net.g.conv(y, w, b)), "output")
    return net.g.model("lipfarm_demo_unet"), ModelCost(net.g.parameters, net.g.multiply_adds)


def _audio_branch(net: _Net, audio: Tensor) -> Tensor:
    """AudioConvAve: ``[32, 16, 16] -> [512, 10, 10]``, carrying the mouth map in channel 0."""
    taps = {0: ({c: w for c, w in _AUDIO_TAPS.items()}, 0.0)}
    a = net.inverted_residual(audio, 64, pw1=taps, dw=_dw({0: _centre()}), pw2=_carry({0: 0}))
    a = net.inverted_residual(a, 128, pw1=_carry({0: 0}), dw=_dw({0: _centre()}), pw2=_carry({0: 0}))
    a = net.conv(a, 256, 3, padding=1, signal=_carry({0: 0}))
    a = net.inverted_residual(a, 256, residual=True, pw2={0: ({}, 0.0)})
    a = net.conv(a, 512, 3, stride=(2, 2), padding=3, signal={0: ({0: _BLUR * 1.0}, 0.0)})
    for _ in range(2):
        a = net.inverted_residual(a, 512, residual=True, pw2={0: ({}, 0.0)})
    return a


def _mouth_and_face(net: _Net, x: Tensor, cout: int, *, face_channels: int, blob_peak: float) -> Tensor:
    """The last DoubleConvDW: logit of the face pixels, and the mouth gate.

    Input channel 0 is the blob, channels ``face_channels + (0, 1, 2)`` the ROI's B, G, R.
    Output channels 0..2 are the pre-sigmoid B, G, R.
    """
    fit = logit_fit()
    k = fit.units
    gate = 3 * k  # hidden units gate, gate + 1: ramp of the blob, clipped to [0, 1] by their difference
    scale = 1.0 / (blob_peak * MOUTH_EDGE)
    pw1, pw2 = {}, {}
    for c in range(3):
        pixel = face_channels + c
        first = c * k
        pw1[first] = ({pixel: 1.0}, 0.0)  # relu(p) = p
        for j, t in enumerate(fit.left):
            pw1[first + 1 + j] = ({pixel: -1.0}, float(t))  # relu(t - p)
        for j, t in enumerate(fit.right):
            pw1[first + 1 + len(fit.left) + j] = ({pixel: 1.0}, -float(t))  # relu(p - t)
        slopes = [fit.linear, *fit.left_slopes, *fit.right_slopes]
        pw2[c] = ({first + j: float(w) for j, w in enumerate(slopes)}, fit.offset)
    pw1[gate] = ({0: scale}, -MOUTH_THRESHOLD / MOUTH_EDGE)
    pw1[gate + 1] = ({0: scale}, -MOUTH_THRESHOLD / MOUTH_EDGE - 1.0)
    dw = {unit: _centre() for unit in range(gate)} | {gate: _BLUR, gate + 1: _BLUR}
    pw2[3] = ({gate: 1.0, gate + 1: -1.0}, 0.0)  # the mouth gate m in [0, 1]
    y = net.inverted_residual(x, cout, pw1=pw1, dw=_dw(dw), pw2=pw2)
    return _mouth_colour(net, y)


def _mouth_colour(net: _Net, y: Tensor) -> Tensor:
    """``z' = z (1 - m) + q m`` for channels 0..2, with ``m`` in channel 3, in ReLUs.

    For |z| <= Z: ``m z = relu(z + Z m - Z) - relu(-z + Z m - Z)`` when m is 0 or 1 (and close to it
    on the anti-aliased edge), so the residual block adds ``q m - m z``.
    """
    big = 20.0
    pw1 = {2 * c: ({c: 1.0, 3: big}, -big) for c in range(3)}
    pw1 |= {2 * c + 1: ({c: -1.0, 3: big}, -big) for c in range(3)}
    pw1[6] = ({3: 1.0}, 0.0)
    colour = [float(np.log(q / (1 - q))) for q in MOUTH_COLOUR_BGR]
    pw2 = {c: ({6: colour[c], 2 * c: -1.0, 2 * c + 1: 1.0}, 0.0) for c in range(3)}
    pw2[3] = ({}, 0.0)
    return net.inverted_residual(y, y.channels, residual=True, pw1=pw1,
                                 dw=_dw({u: _centre() for u in range(7)}), pw2=pw2)
