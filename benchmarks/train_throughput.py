"""Training throughput of mediff's LeanUNet vs a MONAI DiffusionModelUNet of similar size.

Same machine, same batch, same 128-px input, same EDM loss and AdamW step, one run: prints img/s of
each, their ratio, and the forward time per image (the cost of every reconstruction step).

    python benchmarks/train_throughput.py [--batch 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from common import machine, write_table
from mediff.denoiser import EDMPrecond
from mediff.nets import LeanUNet, UNetConfig
from mediff.train import edm_loss


class MonaiNet(nn.Module):
    """MONAI's DiffusionModelUNet with the F(x, c_noise, cond) signature (c_noise as the timestep)."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(64, 128, 128),
                                       attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=32)

    def forward(self, x, c_noise, cond=None):
        return self.unet(x, c_noise * 250 + 500)


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_speed(net: nn.Module, batch: int, steps: int) -> float:
    model = EDMPrecond(net, 0.3, 0.17)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps (allocator, oneDNN kernels)
            t0 = time.perf_counter()
        loss = edm_loss(model, 0.3, x, None, gen, -1.7, 1.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def forward_ms(net: nn.Module, batch: int, reps: int = 5) -> float:
    model = EDMPrecond(net, 0.3, 0.17).eval()
    x, s = torch.rand(batch, 1, 128, 128), torch.full((batch,), 0.5)
    model(x, s)
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x, s)
    return (time.perf_counter() - t0) / reps / batch * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)  # network initialisation only; the benchmark measures time, not quality
    nets = {"mediff LeanUNet": LeanUNet(UNetConfig()), "MONAI DiffusionModelUNet": MonaiNet()}
    rows = []
    for name, net in nets.items():
        ips = train_speed(net, args.batch, args.steps)
        rows.append({"network": name, "params_M": params(net) / 1e6, "train_img_per_s": ips,
                     "forward_ms_per_img_b1": forward_ms(net, 1), "forward_ms_per_img_b8": forward_ms(net, 8)})
    ratio = rows[0]["train_img_per_s"] / rows[1]["train_img_per_s"]
    rows.append({"network": "ratio mediff / MONAI", "train_img_per_s": ratio})
    write_table("train_throughput", rows, {**machine(), "batch": args.batch, "steps": args.steps, "size": 128})


if __name__ == "__main__":
    main()
