"""Training data for user-level privacy: users Poisson-sampled each step (Opacus's DPDataLoader), each
sampled user giving one window of their history, chosen at random. A user then weighs on a step through one
clipped gradient at most, whatever the length of their history."""

from __future__ import annotations

import numpy as np
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, Dataset

from multimodal_rec.data.sequences import TrainWindows


class UserWindows(Dataset):
    """One entry per user with training windows; reading it gives one of that user's windows at random."""

    def __init__(self, windows: TrainWindows, seed: int = 0):
        self.windows = windows
        users = windows.windows[:, 0]
        order = np.argsort(users, kind="stable")
        self.users, starts = np.unique(users[order], return_index=True)
        self.groups = np.split(order, starts[1:])
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> dict:
        return self.windows[int(self.rng.choice(self.groups[index]))]


def user_sampled_loader(windows: TrainWindows, expected_batch: int, seed: int = 0) -> DataLoader:
    """Poisson sampling of users at rate expected_batch / users: batches vary in size, may be empty."""
    users = UserWindows(windows, seed)
    return DPDataLoader.from_data_loader(DataLoader(users, batch_size=min(expected_batch, len(users))))
