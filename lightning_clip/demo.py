"""The built-in example: an MLP classifier on mnist1d, with the data generated locally (no download)."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip._lightning import preferred

#: ``lightning.pytorch`` when installed, else ``pytorch_lightning`` (``$LIGHTNING_CLIP_NAMESPACE`` picks one).
pl = preferred().module

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]

_CACHE: dict[int, dict] = {}


def mnist1d_arrays(seed: int = 42, cache_dir: str | None = None) -> dict:
    """The mnist1d data set (4000 train, 1000 test sequences of length 40, 10 classes), generated locally.

    Uses ``mnist1d.data.make_dataset(get_dataset_args())`` (about a second or two), never its download path;
    kept in memory for the process and, when ``cache_dir`` is given, in a pickle there.
    """
    if seed in _CACHE:
        return _CACHE[seed]
    path = Path(cache_dir) / f"mnist1d-seed{seed}.pkl" if cache_dir else None
    if path is not None and path.exists():
        with open(path, "rb") as f:
            data = pickle.load(f)
    else:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError('the mnist1d example needs the "cli" extra: pip install "lightning-clip[cli]"') from err
        args = get_dataset_args()
        args.seed = seed
        full = make_dataset(args)
        data = {k: full[k] for k in ("x", "y", "x_test", "y_test")}
        if path is not None:
            os.makedirs(path.parent, exist_ok=True)
            with open(path, "wb") as f:
                pickle.dump(data, f)
    _CACHE[seed] = data
    return data


def _as_dataset(x, y) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y).long())


class MNIST1DDataModule(pl.LightningDataModule):
    """mnist1d as a Lightning data module.

    Training reads the 4000 training sequences; validation, test and predict all read the 1000 held-out ones
    (mnist1d's test split), in order.

    Args:
        batch_size: samples per training batch.
        seed: the generator seed of mnist1d (42 is the published data set).
        shuffle: reshuffle the training set every epoch.
        cache_dir: optional folder to keep the generated arrays in between runs.
        eval_batch_size: samples per batch of validation, test and predict (1000: the held-out split in one).
    """

    def __init__(
        self,
        batch_size: int = 100,
        seed: int = 42,
        shuffle: bool = True,
        cache_dir: str | None = None,
        eval_batch_size: int = 1000,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}; expected >= 1")
        if eval_batch_size < 1:
            raise ValueError(f"Invalid eval_batch_size: {eval_batch_size!r}; expected >= 1")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.eval_batch_size = eval_batch_size

    def setup(self, stage: str) -> None:
        d = mnist1d_arrays(self.seed, self.cache_dir)
        self.train_set = _as_dataset(d["x"], d["y"])
        self.val_set = self.test_set = self.predict_set = _as_dataset(d["x_test"], d["y_test"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size)


class MNIST1DClassifier(pl.LightningModule):
    """An MLP ``40 -> hidden -> ... -> 10`` with ReLU, trained with cross-entropy.

    The optimizer is Adam at ``lr`` unless ``optimizer`` is given: a callable ``params -> Optimizer``, which is how
    LightningCLI injects one (``model.optimizer: {class_path: ..., init_args: ...}``). LightningCLI's own
    ``--optimizer`` argument overrides both.

    Args:
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        lr: learning rate of the default Adam.
        optimizer: optional optimizer factory, called with the parameters.
        init_scale: multiplies the initial weights; values well above 1 make the first gradients explode
            (the case where Adam alone diverges and clipping brakes from the first step).
        spike_every: when > 0, every ``spike_every``-th optimizer step (steps ``spike_every - 1``,
            ``2 * spike_every - 1``, ... counted from 0) back-propagates ``spike_scale`` times the loss: a rare
            gradient spike, as an outlier batch gives in real training. The logged ``train/loss`` stays the
            unscaled loss; ``train/spike`` is 1 on those steps. With ``log_every_n_steps`` dividing
            ``spike_every``, every spike falls on a logging step and shows on the dashboard.
        spike_scale: the factor of a spike step's loss (and so of its gradient), > 0.
    """

    def __init__(
        self,
        hidden: int = 100,
        depth: int = 2,
        lr: float = 0.01,
        optimizer: OptimizerCallable | None = None,
        init_scale: float = 1.0,
        spike_every: int = 0,
        spike_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if isinstance(spike_every, bool) or not isinstance(spike_every, int) or spike_every < 0:
            raise ValueError(f"Invalid spike_every: {spike_every!r}; expected an integer >= 0 (0: no spike)")
        if isinstance(spike_scale, bool) or not isinstance(spike_scale, (int, float)) or not 0 < spike_scale < math.inf:
            raise ValueError(f"Invalid spike_scale: {spike_scale!r}; expected a finite number > 0")
        self.save_hyperparameters(ignore=["optimizer"])
        layers: list[nn.Module] = []
        width = 40
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)
        if init_scale != 1.0:
            with torch.no_grad():
                for p in self.net.parameters():
                    p.mul_(init_scale)
        self.lr = lr
        self.optimizer_factory = optimizer
        self.spike_every = spike_every
        self.spike_scale = float(spike_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        if self.spike_every and (self.trainer.global_step + 1) % self.spike_every == 0:
            self.log("train/spike", 1.0)
            return loss * self.spike_scale
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        """Logs ``{stage}/loss`` (mean cross-entropy) and ``{stage}/acc`` (accuracy), weighted by batch size."""
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), prog_bar=True, batch_size=len(y))
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/acc`` over the held-out split."""
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test/loss`` and ``test/acc`` over the held-out split (``lightning-clip test``)."""
        self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """The predicted class (0-9) of each sequence of the batch; labels, when the batch has them, are ignored."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self.parameters())
        return torch.optim.Adam(self.parameters(), lr=self.lr)
