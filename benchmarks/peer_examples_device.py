"""pytorch/examples' MLP VAE (784-400-20, Adam 1e-3, batch 128, BCE summed + analytic KL) on any device,
as its main.py runs it with --cuda: the model on the device, each DataLoader batch moved there. The
CPU peer of record is ../shared/bench/peer_examples.py; this copy exists for machines where that folder
is not there (the lent GPU machine) and differs from it only in the device. Fashion-MNIST's IDX files
come from $FMNIST_DIR (default: the Debian package's folder). Prints one JSON line.

    python benchmarks/peer_examples_device.py --device cuda --epochs 10
"""

import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
from torch import nn, optim
from torch.nn import functional as F

ROOT = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")


def load(split: str) -> torch.Tensor:
    pre = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(ROOT, f"{pre}-images-idx3-ubyte.gz"), "rb") as f:
        data = f.read()
    n = int.from_bytes(data[4:8], "big")
    x = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 784).astype(np.float32) / 255.0
    return torch.from_numpy(x)


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def loss_fn(r: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return F.binary_cross_entropy(r, x, reduction="sum") + kl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(1)
    device = torch.device(args.device)
    xtr, xte = load("train"), load("test")
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xtr), batch_size=args.batch_size, shuffle=True,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    model = VAE().to(device)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    t0, seen = time.perf_counter(), 0
    for _ in range(args.epochs):
        model.train()
        for (x,) in train:
            x = x.to(device)
            opt.zero_grad()
            r, mu, lv = model(x)
            loss = loss_fn(r, x, mu, lv)
            loss.backward()
            loss.item()  # main.py reads the loss every step (train_loss += loss.item())
            opt.step()
            seen += len(x)
    train_s = time.perf_counter() - t0
    model.eval()
    tot = 0.0
    with torch.no_grad():
        for i in range(0, len(xte), 1000):
            x = xte[i : i + 1000].to(device)
            r, mu, lv = model(x)
            tot += loss_fn(r, x, mu, lv).item()
    print(json.dumps({"peer": "pytorch-examples-vae", "device": str(device), "epochs": args.epochs,
                      "train_s": round(train_s, 2), "samples_per_s": round(seen / train_s),
                      "test_nelbo": round(tot / len(xte), 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
