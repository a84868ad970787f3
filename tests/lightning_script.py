"""A small Lightning training run, driven by tests/test_lightning.py in subprocesses.

Usage: python lightning_script.py CONFIG_JSON. Every training step's loss is appended to
``losses`` (one JSON line: global step, loss as a float hex string, so equality is bit
equality). ``kill_at_step`` SIGKILLs the process at the start of that global step;
``kill_in_save`` SIGKILLs it inside the Nth atomic rename of a ``last.ckpt`` (the new
file written, not yet in place).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from torchkeep.integrations.lightning import RNGStateCallback, TorchkeepCheckpointIO


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Dropout(0.3),
            torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 0.01 * torch.randn_like(x)  # augmentation: draws from the RNG
        loss = torch.nn.functional.mse_loss(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.body(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


class Record(Callback):
    def __init__(self, path: str, kill_at: int | None) -> None:
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step - 1, float(outputs["loss"]).hex()]) + "\n")


def _kill_in_save(nth: int) -> None:
    real = os.replace
    count = [0]

    def replace(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith("last.ckpt"):
            count[0] += 1
            if count[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("kill_in_save"):
        _kill_in_save(cfg["kill_in_save"])
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 8), torch.randn(96, 1))
    if cfg.get("stateful"):
        from torchdata.stateful_dataloader import StatefulDataLoader

        train = StatefulDataLoader(data, batch_size=8, shuffle=True,
                                   num_workers=cfg.get("workers", 0))
    else:
        train = DataLoader(data, batch_size=8, shuffle=True)
    val = DataLoader(data, batch_size=32)
    every = cfg.get("every_n_train_steps")
    checkpoint = ModelCheckpoint(
        dirpath=cfg["dir"], save_top_k=2, monitor="train_loss" if every else "val_loss",
        save_last=True, every_n_train_steps=every)
    callbacks: list[Callback] = [checkpoint, Record(cfg["losses"], cfg.get("kill_at_step"))]
    if cfg.get("rng", True):
        callbacks.append(RNGStateCallback())
    plugins = []
    if cfg.get("plugin", True):
        io = TorchkeepCheckpointIO(async_save=cfg.get("async_save", False))
        if cfg.get("lightning_async"):
            from lightning.pytorch.plugins.io import AsyncCheckpointIO

            io = AsyncCheckpointIO(io)
        plugins.append(io)
    trainer = L.Trainer(
        max_epochs=cfg.get("epochs", 4), accelerator="cpu", devices=1, deterministic=True,
        enable_progress_bar=False, logger=False, enable_model_summary=False,
        callbacks=callbacks, plugins=plugins, default_root_dir=cfg["dir"])
    trainer.fit(Net(), train, val, ckpt_path=cfg.get("ckpt_path"))


if __name__ == "__main__":
    main()
