"""Reference logits of torchvision's ResNet-50 for diffii's forward parity test.

The weights are not random draws from torch's generator (which Rust cannot replay) but a
closed-form function of each state-dict key and element index, computed in float64 and rounded
to float32 — the test rebuilds the very same weights, so only the input recipe and the outputs
need to be stored (a few KB instead of 100 MB):

    w[key][i] = scale(key) * sin(0.37 * i + phase(key)),  phase = (sum of key bytes mod 97) / 10

with scale = sqrt(2 / fan_in) for convolutions (fan_in = in_channels * kh * kw), 0.02 for the
linear layer and biases, BatchNorm weight 1 + 0.1 * sin(...), bias 0.05 * sin(...), running
mean 0.05 * sin(...), running var 0.5 + 0.25 * (1 + sin(...)). The input is
x[i] = sin(0.011 * i) over a [2, 3, 64, 64] tensor (row-major), given to the model as is.

Usage (torch and torchvision from PyPI):
    python scripts/reference/ref_resnet50.py --out tests/fixtures/resnet50_ref.json
"""
import argparse
import json

import numpy as np
import torch
import torchvision


def phase(key: str) -> float:
    return (sum(key.encode()) % 97) / 10.0


def values(key: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    s = np.sin(0.37 * np.arange(n, dtype=np.float64) + phase(key))
    if key.endswith("running_var"):
        v = 0.5 + 0.25 * (1.0 + s)
    elif key.endswith("running_mean"):
        v = 0.05 * s
    elif len(shape) == 4:
        v = np.sqrt(2.0 / (shape[1] * shape[2] * shape[3])) * s
    elif key.startswith("fc.") or key.endswith("bias"):
        v = (0.05 if key.endswith("bias") and not key.startswith("fc.") else 0.02) * s
    else:  # BatchNorm weight
        v = 1.0 + 0.1 * s
    return v.astype(np.float32).reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = torchvision.models.resnet50(weights=None, num_classes=a.classes).eval()
    state = model.state_dict()
    for k, t in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        t.copy_(torch.from_numpy(values(k, tuple(t.shape))))
    shape = (2, 3, 64, 64)
    x = torch.from_numpy(np.sin(0.011 * np.arange(int(np.prod(shape)), dtype=np.float64)).astype(np.float32).reshape(shape))
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
        logits = model.fc(feats)
        # The same in float64, to state how far float32 itself is from exact.
        m64 = model.double()
        logits64 = m64(x.double())
    out = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "classes": a.classes,
        "input_shape": list(shape),
        "logits": logits.flatten().tolist(),
        "logits_f64": logits64.flatten().tolist(),
        "features_sum": [float(v) for v in feats.sum(dim=1)],
        "f32_vs_f64_max_abs": float((logits.double() - logits64).abs().max()),
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
