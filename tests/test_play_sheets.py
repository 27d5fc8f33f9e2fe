"""Contact sheets (play.sheets): the right frames, real | model, tiled in order."""

import itertools

import numpy as np
import torch

from play.generator import FrameGenerator
from play.sheets import GAP, frames_at
from worldmodel.actions import make_action
from worldmodel.envs import make_world
from worldmodel.frames import tile_grid
from worldmodel.model import build_model
from worldmodel.session import Session


def test_frames_at_picks_the_frames_a_side_by_side_run_shows(one_thread):
    model = build_model("tiny", seed=0)
    h, w = model.frame_size
    make = lambda: FrameGenerator(Session(model, batch=1, seed=1), make_world("procedural", batch=1, height=h, width=w))  # noqa: E731
    action = make_action(model.action_spec, ["W"], 5, 0)
    shown = frames_at(make(), itertools.repeat(action), (0, 2, 3), seed=0)
    generator = make()
    every = [generator.reset(0)] + [generator.step(action) for _ in range(3)]
    assert len(shown) == 3 and shown[0].shape == (h, 2 * w + GAP, 3)
    for tile, index in zip(shown, (0, 2, 3)):
        assert np.array_equal(tile[:, :w], every[index].panels[0])  # the world is deterministic
        assert np.abs(tile[:, -w:].astype(int) - every[index].panels[1].astype(int)).max() <= 1


def test_grid_places_tiles_row_by_row():
    tiles = [[np.full((2, 3, 3), 10 * r + c, np.uint8) for c in range(2)] for r in range(3)]
    sheet = np.asarray(tile_grid(tiles, GAP))
    assert sheet.shape == (3 * 2 + 2 * GAP, 2 * 3 + GAP, 3)
    for r in range(3):
        for c in range(2):
            y, x = r * (2 + GAP), c * (3 + GAP)
            assert (sheet[y : y + 2, x : x + 3] == 10 * r + c).all()
    assert (sheet[2:GAP + 2, :] == 255).all()  # white between rows
