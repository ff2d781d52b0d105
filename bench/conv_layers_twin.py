"""PyTorch twin of examples/conv_layers.rs: the same convolution shapes, timed the same way
(the convolution's input and weight gradients from a random output gradient), channels_last as PyTorch users run CNNs on the CPU. Run as its own
process, alternated with the candle side:

    OMP_NUM_THREADS=2 python3 bench/conv_layers_twin.py [rounds]

IMG=<px> scales the planes to another input size than 128, as the candle side does.
"""
import os
import statistics
import sys
import time

import torch

SHAPES = [
    ("stem 7x7 s2", 1, 128, 64, 7, 2, 3, 1),
    ("layer1 3x3", 64, 32, 64, 3, 1, 1, 4),
    ("layer2 3x3 s2", 64, 32, 128, 3, 2, 1, 1),
    ("layer2 3x3", 128, 16, 128, 3, 1, 1, 3),
    ("layer2 1x1 s2", 64, 32, 128, 1, 2, 0, 1),
    ("layer3 3x3 s2", 128, 16, 256, 3, 2, 1, 1),
    ("layer3 3x3", 256, 8, 256, 3, 1, 1, 3),
    ("layer4 3x3 s2", 256, 8, 512, 3, 2, 1, 1),
    ("layer4 3x3", 512, 4, 512, 3, 1, 1, 3),
    ("layer4 1x1 s2", 256, 8, 512, 1, 2, 0, 1),
]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.set_num_threads(2)
    fmt = torch.channels_last
    print("| conv | count | fwd ms | bwd ms |")
    print("|---|---|---|---|")
    tf = tb = 0.0
    img = int(os.environ.get("IMG", "128"))
    for name, c, h, o, k, s, p, count in SHAPES:
        h = h * img // 128
        x = torch.randn(32, c, h, h).to(memory_format=fmt).requires_grad_()
        w = (torch.randn(o, c, k, k) * 0.05).to(memory_format=fmt).requires_grad_()
        side = (h + 2 * p - k) // s + 1
        up = torch.randn(32, o, side, side).to(memory_format=fmt)
        f, b = [], []
        for _ in range(rounds + 1):
            t = time.perf_counter()
            y = torch.nn.functional.conv2d(x, w, stride=s, padding=p)
            f.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            grads = torch.autograd.grad(y, (x, w), up)
            b.append((time.perf_counter() - t) * 1e3)
            del grads
        f, b = statistics.median(f[1:]), statistics.median(b[1:])
        tf += f * count
        tb += b * count
        print(f"| {name} | {count} | {f:.1f} | {b:.1f} |")
    print(f"| total (x count) | | {tf:.0f} | {tb:.0f} |")


main()
