#!/usr/bin/env python3
"""The PyTorch twin of `pretext bench train`: the same models, shapes and step (forward, backward,
AdamW) on random data, timed the same way (median after one warm-up step, peak RSS over the timed
steps via /proc/self/clear_refs). Prints one JSON object with the fields of the Rust side.

PyTorch runs as its users run it: attention through F.scaled_dot_product_attention (timm's
default), CNN activations in channels_last; --attention explicit and --memory-format contiguous
give the slower forms, --precision bf16 the autocast one.

`pretext bench train` runs this in a process of its own; by hand:
    OMP_NUM_THREADS=2 python3 bench/train_twin.py --model mae --img 64 --patch 8 --threads 2
Needs only torch (torchvision is not used: the CNNs are written out here with torchvision's shapes).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Set from --attention in main(): scaled_dot_product_attention (timm's default) or the ops written out.
FUSED_ATTENTION = True


def sincos_2d(dim, grid):
    """The MAE's fixed 2-D sin-cos position embedding, with a zero row for the cls token."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)
    gh, gw = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy")
    emb = torch.cat([one_d(dim // 2, gh), one_d(dim // 2, gw)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float().unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if FUSED_ATTENTION:
            # What timm runs (fused_attn): PyTorch as its users run it.
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Mae(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.p, self.grid = a.patch, a.img // a.patch
        self.patch_embed = nn.Conv2d(1, a.dim, a.patch, a.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.dim))
        self.register_buffer("pos_embed", sincos_2d(a.dim, self.grid))
        self.blocks = nn.ModuleList(Block(a.dim, a.heads) for _ in range(a.depth))
        self.norm = nn.LayerNorm(a.dim, eps=1e-6)
        self.decoder_embed = nn.Linear(a.dim, a.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, a.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(a.decoder_dim, self.grid))
        self.decoder_blocks = nn.ModuleList(
            Block(a.decoder_dim, a.decoder_heads) for _ in range(a.decoder_depth))
        self.decoder_norm = nn.LayerNorm(a.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(a.decoder_dim, a.patch * a.patch)
        self.mask_ratio = a.mask_ratio

    def forward(self, imgs):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        n, l, d = x.shape
        keep = int(l * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(n, l, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, l, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        tokens = self.mask_token.repeat(n, l + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        g, p = self.grid, self.p
        target = imgs.reshape(n, 1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


class Vit(nn.Module):
    def __init__(self, a, classes=4):
        super().__init__()
        grid = a.img // a.patch
        self.patch_embed = nn.Conv2d(1, a.dim, a.patch, a.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, a.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(a.dim, a.heads) for _ in range(a.depth))
        self.norm = nn.LayerNorm(a.dim, eps=1e-6)
        self.head = nn.Linear(a.dim, classes)

    def forward(self, imgs):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.layers(x).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=4):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(out)))], 1)


class DenseNet121(nn.Module):
    def __init__(self, classes=4, growth=32, init=64, blocks=(6, 12, 24, 16)):
        super().__init__()
        mods, c = [nn.Conv2d(1, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init), nn.ReLU(),
                   nn.MaxPool2d(3, 2, 1)], init
        for i, n in enumerate(blocks):
            for _ in range(n):
                mods.append(DenseLayer(c, growth))
                c += growth
            if i != len(blocks) - 1:
                mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                         nn.AvgPool2d(2, 2)]
                c //= 2
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae", choices=["mae", "vit", "resnet", "densenet"])
    for name, default in [("img", 64), ("patch", 8), ("dim", 192), ("depth", 12), ("heads", 3),
                          ("decoder-dim", 128), ("decoder-depth", 2), ("decoder-heads", 4),
                          ("batch", 32), ("steps", 5), ("threads", 2)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "explicit"],
                    help="sdpa: F.scaled_dot_product_attention, as timm runs it (default)")
    ap.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"],
                    help="layout of the CNNs' activations (default channels_last, the fast one on CPUs)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: autocast on the forward pass, loss and optimiser in fp32")
    a = ap.parse_args()
    global FUSED_ATTENTION
    FUSED_ATTENTION = a.attention == "sdpa"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = {"mae": Mae, "vit": Vit, "resnet": ResNet18, "densenet": DenseNet121}[a.model]
    model = model(a) if a.model in ("mae", "vit") else model()
    dev = torch.device(a.device)
    cnn = a.model in ("resnet", "densenet")
    fmt = torch.channels_last if cnn and a.memory_format == "channels_last" else torch.contiguous_format
    model.to(dev, memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(a.batch, 1, a.img, a.img, device=dev).contiguous(memory_format=fmt)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    y = torch.arange(a.batch, device=dev) % 4

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        with autocast:
            out = model(x)
        loss = out.float() if a.model == "mae" else F.cross_entropy(out.float(), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        if not math.isfinite(loss.item()):
            raise SystemExit("loss is not finite")
        return [(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3]

    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = [step() for _ in range(a.steps)]
    med = statistics.median(sum(t) for t in times)
    print(json.dumps({
        "impl": f"pytorch ({a.device}{', bf16 autocast' if a.precision == 'bf16' else ''})", "model": a.model, "img": a.img, "patch": a.patch, "dim": a.dim,
        "depth": a.depth, "heads": a.heads, "batch": a.batch, "threads": a.threads,
        "steps": a.steps, "step_ms_median": med, "steps_per_s": 1e3 / med,
        "forward_ms": statistics.median(t[0] for t in times),
        "backward_ms": statistics.median(t[1] for t in times),
        "optimizer_ms": statistics.median(t[2] for t in times),
        "peak_rss_mib": peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
