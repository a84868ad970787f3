"""The file round trip: the classic checkpoint dict saved by torchkeep, read by torch and back."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch

import torchkeep
from torchkeep.demo.model import SeedNet, make_optimizer

__all__ = ["run_files_demo"]


def run_files_demo(echo: Callable[[str], None] = print) -> bool:
    """Train the seed model a few steps, save the tutorial's checkpoint dict with torchkeep,
    load it with stock ``torch.load(weights_only=True)`` and with torchkeep (both backends),
    and compare the restored models' outputs. Returns True when everything matches.
    """
    torch.manual_seed(0)
    model = SeedNet()
    optimizer = make_optimizer(model)
    inputs = torch.randn(8, 3, 32, 32)
    targets = torch.randint(0, 10, (8,))
    loss = torch.tensor(0.0)
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    checkpoint = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": loss.item(),
    }
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("seed.pt", "seed.safetensors"):
            path = os.path.join(tmp, name)
            torchkeep.save(checkpoint, path)
            echo(f"saved {name}: {os.path.getsize(path):,} bytes")
            readers = {"torchkeep (torch backend)": lambda p=path: torchkeep.load(p)}
            if name.endswith(".pt"):
                readers["stock torch.load(weights_only=True)"] = lambda p=path: torch.load(
                    p, weights_only=True
                )
            for reader, load in readers.items():
                loaded = load()
                restored = SeedNet()
                restored.load_state_dict(loaded["model_state_dict"])
                opt = make_optimizer(restored)
                opt.load_state_dict(loaded["optimizer_state_dict"])
                with torch.no_grad():
                    same = torch.equal(restored(inputs), model(inputs))
                extras = loaded["epoch"] == 3 and loaded["loss"] == checkpoint["loss"]
                echo(f"  {reader:<38} outputs identical: {same}  epoch/loss: {extras}")
                ok &= same and extras
            arrays = torchkeep.load(path, backend="numpy")
            weight = arrays["model_state_dict"]["fc1.weight"]
            same = bool((weight == model.fc1.weight.detach().numpy()).all())
            echo(f"  {'torchkeep (numpy backend)':<38} fc1.weight identical: {same}")
            ok &= same
    echo("all round trips identical" if ok else "MISMATCH")
    return ok
