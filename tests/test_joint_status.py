"""Statuses of joint fits: an unstable bias correction flags only the emitters it concerns
(spotfit.group.emitter_status)."""

from types import SimpleNamespace

import numpy as np

import spotfit
from spotfit._kernels import CONVERGED, LOW_SIGNAL, SINGULAR
from spotfit.group import emitter_status


def test_emitter_status_keeps_the_flag_on_the_emitters_concerned():
    # 4 windows of two emitters: params 0-2 emitter 0, 3-5 emitter 1, 6 shared offset
    unstable = np.zeros((4, 7), bool)
    unstable[0, 4] = True  # emitter 1's correction only
    unstable[1, 6] = True  # the shared offset: both
    unstable[3, 1] = True  # a window already singular stays so
    sol = SimpleNamespace(status=np.array([LOW_SIGNAL, LOW_SIGNAL, CONVERGED, SINGULAR]), unstable=unstable)
    first = emitter_status(sol, np.array([0, 1, 2, 6]), 6)
    second = emitter_status(sol, np.array([3, 4, 5, 6]), 6)
    assert list(first) == [CONVERGED, LOW_SIGNAL, CONVERGED, SINGULAR]
    assert list(second) == [LOW_SIGNAL, LOW_SIGNAL, CONVERGED, SINGULAR]
    # both emitters at once (group._fit_bucket): column i is emitter i's, with or without flags
    both = emitter_status(sol, np.array([[0, 1, 2, 6], [3, 4, 5, 6]]), 6)
    assert both.shape == (4, 2) and list(both[:, 0]) == list(first) and list(both[:, 1]) == list(second)
    calm = SimpleNamespace(status=sol.status, unstable=np.zeros((4, 7), bool))
    assert emitter_status(calm, np.array([[0, 1, 2, 6], [3, 4, 5, 6]]), 6).tolist() == \
        np.repeat(sol.status[:, None], 2, axis=1).tolist()


def test_bright_spots_of_a_crowded_field_are_not_low_signal():
    # 1 spot per 100 px^2 (dense: joint fits by default); before, a group with one
    # unstable emitter made all its emitters low_signal, bright ones included
    cam = spotfit.Camera(baseline=100.0, gain=1.0)
    img, truth = spotfit.simulate((180, 260), n_spots=468, photons=(1000.0, 3000.0), background=20.0,
                                  sigma=1.3, camera=cam, seed=3)
    tab = spotfit.fit(img, camera=cam, sigma=1.3)
    low = tab[tab["status"] == "low_signal"]
    snr = (low["intensity"] / low["intensity_err"]).to_numpy()
    assert np.sum(snr > 15) == 0, snr  # low_signal means min_snr = 3 is not reached (5x margin)
    assert (tab["status"] == "converged").mean() > 0.9
