"""A small MLP trained on scikit-learn's real 8×8 digits and exported to ONNX: the teacher that
the finetuning and rounding tests convert."""
import torch
from sklearn.datasets import load_digits

from mfconvert.calibrate.data import Examples
from mfconvert.convert.torch_entry import export_onnx


def trained_digits_mlp(activation: torch.nn.Module, path: str) -> tuple[torch.nn.Sequential, Examples]:
    """(64 → 128 → 10 MLP trained 150 Adam steps, every digit as an example); written to `path`."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), activation, torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(mlp.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    export_onnx(mlp, (x[:2],), path, input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}})
    return mlp, Examples([{"x": row} for row in x.numpy()])
