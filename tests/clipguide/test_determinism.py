import threading

import torch

from clipguide import deterministic


def _settings():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.utils.deterministic.fill_uninitialized_memory)


def test_cpu_runs_change_nothing():
    before = _settings()
    with deterministic("cpu"):
        assert _settings() == before


def test_cuda_settings_hold_until_the_last_holder_leaves_then_come_back():
    before = _settings()
    on = (True, True, True, False, False)
    entered, release = threading.Barrier(3), threading.Event()
    seen = []

    def job():
        with deterministic("cuda"):
            entered.wait()
            release.wait()
            seen.append(_settings())

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    assert _settings() == on
    with deterministic("cuda"):   # re-entrant from the main thread too
        assert _settings() == on
    assert _settings() == on      # the two jobs still hold it
    release.set()
    for t in threads:
        t.join()
    assert seen == [on, on] and _settings() == before
