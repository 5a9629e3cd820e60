#!/usr/bin/env python3
"""CPU timing of the classifier steps `diffii bench --classifier` times, in PyTorch (torch +
torchvision only, nothing downloaded), for the same-run ratio in its table.

Networks (fresh weights; the values do not matter for the timing):
- "small": diffii's `ResNetConfig::small(classes, depth)` (src/classify/resnet.rs), the
  CIFAR-style ResNet of He et al. section 4.2: conv3x3(3 -> 16, stride 1, no bias), BatchNorm,
  ReLU, no max-pool; three stages of `depth` torchvision BasicBlocks of widths 16 / 32 / 64
  (stride 2 on the first block of the second and third stage, a conv1x1 + BatchNorm
  projection where the shape changes); global average pooling; Linear(64, classes).
- "resnet50": torchvision's `resnet50(weights=None, num_classes=classes)`, fed through the
  ImageNet normalisation that diffii's `--arch resnet50` applies inside its forward
  (x01 = (x + 1) / 2, then (x01 - mean) / std).

Timed cases, float32 (or --dtype bf16: the model and input converted with `.to(torch.bfloat16)`):
- train step, model.train():
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(x), targets, label_smoothing=0.1)   # one-hot probability targets
      loss.backward()
      opt.step()          # SGD(lr 0.01, momentum 0.9, dampening 0, weight_decay 5e-4, nesterov)
  exactly diffii's bench step (src/measure/bench.rs `classifier_steps`): fresh gradients each
  step, weight decay on every parameter, BatchNorm with batch statistics and running-average
  updates, labels i % classes.
- eval forward: model.eval() under torch.no_grad().
Each case: --warmup untimed calls, then --reps timed ones; median / min / max wall seconds and
the process CPU seconds are reported, with torch.set_num_threads(--threads).

Usage:
    python scripts/reference/bench_classifier.py --threads 2 --reps 3 [--depth 1 --classes 10
        --batch 64 --size 32] [--resnet50 --resnet50-batch 8 --resnet50-size 224 --resnet50-reps 3]
        [--no-small] [--dtype f32|bf16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
try:
    import torchvision
    from torchvision.models.resnet import BasicBlock
except ImportError:  # a PyTorch install without torchvision: the small network needs only this
    torchvision = None

    class BasicBlock(nn.Module):
        """torchvision.models.resnet.BasicBlock (same modules, names and forward)."""

        expansion = 1

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)

from timing import bench

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallResNet(nn.Module):
    """diffii's ResNetConfig::small(classes, depth), under torchvision's module names."""

    def __init__(self, classes: int, depth: int, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for s, w in enumerate(widths):
            blocks = []
            for b in range(depth):
                stride = 2 if s > 0 and b == 0 else 1
                down = None
                if stride != 1 or cin != w:
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
                blocks.append(BasicBlock(cin, w, stride, down))
                cin = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.nstages = len(widths)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # torchvision's initialisation, as diffii's init_weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        for s in range(self.nstages):
            h = getattr(self, f"layer{s + 1}")(h)
        return self.fc(h.mean(dim=(2, 3)))


class ImageNetInput(nn.Module):
    """diffii's InputNorm::ImageNet in front of a torchvision model: one scale and shift per channel."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        scale = torch.tensor([0.5 / s for s in IMAGENET_STD]).view(1, 3, 1, 1)
        shift = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x):
        return self.model(x * self.scale + self.shift)




def cases(model: nn.Module, classes: int, batch: int, size: int, dtype, reps: int, warmup: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 3, size, size, generator=g).to(dtype)
    labels = torch.arange(batch) % classes
    targets = F.one_hot(labels, classes).to(dtype)
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), targets, label_smoothing=0.1)
        loss.backward()
        opt.step()
        return loss.item()

    def eval_forward():
        with torch.no_grad():
            return model(x).sum().item()

    model.train()
    train = bench(train_step, reps, warmup)
    model.eval()
    ev = bench(eval_forward, reps, warmup)
    meta = {"batch": batch, "size": size, "params": sum(p.numel() for p in model.parameters())}
    return {**meta, **train}, {**meta, **ev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--no-small", action="store_true", help="skip the small ResNet")
    ap.add_argument("--resnet50", action="store_true")
    ap.add_argument("--resnet50-batch", type=int, default=8)
    ap.add_argument("--resnet50-size", type=int, default=224)
    ap.add_argument("--resnet50-reps", type=int, default=None, help="timed reps of the ResNet-50 cases (default --reps)")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.resnet50 and torchvision is None:
        ap.error("--resnet50 needs torchvision, which this Python does not have")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    res: dict = {"threads": a.threads, "torch": torch.__version__, "torchvision": torchvision.__version__ if torchvision else None,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "dtype": a.dtype}

    def report(name, d):
        res[name] = d
        print(name, json.dumps({k: v for k, v in d.items() if k != "runs_s"}), flush=True)

    if not a.no_small:
        train, ev = cases(SmallResNet(a.classes, a.depth), a.classes, a.batch, a.size, dtype, a.reps, a.warmup)
        report("small_train", {"depth": a.depth, **train})
        report("small_eval", {"depth": a.depth, **ev})
    if a.resnet50:
        model = ImageNetInput(torchvision.models.resnet50(weights=None, num_classes=a.classes))
        reps = a.reps if a.resnet50_reps is None else a.resnet50_reps
        train, ev = cases(model, a.classes, a.resnet50_batch, a.resnet50_size, dtype, reps, a.warmup)
        report("resnet50_train", train)
        report("resnet50_eval", ev)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
