
import pytest
import torch

from llmray.train.schedule import LRScheduler, Schedule, ScheduleConfig


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    s = Schedule(ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert [s(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # past the end: stays at the floor
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    s = Schedule(ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2), total_steps=100)
    assert s(4) == pytest.approx(1.0)
    assert all(s(i) == 1.0 for i in range(5, 80))
    assert s(90) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0)


def test_constant_and_zero_warmup():
    s = Schedule(ScheduleConfig(kind="constant", warmup_steps=0), total_steps=10)
    assert [s(i) for i in range(12)] == [1.0] * 12


def test_scheduler_state_restores_the_curve_exactly():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return opt, LRScheduler([opt], ScheduleConfig(kind="cosine", warmup_steps=3), total_steps=20, peak_lr=2.0)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert sched.lr == sched2.lr
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == sched.lr


def test_lr_matches_torch_lambda_lr_bit_for_bit():
    """The curve is torch's LambdaLR's (peak × multiplier), so runs trained before and after agree exactly."""
    cfg = ScheduleConfig(kind="cosine", warmup_steps=5, min_lr_ratio=0.1)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    reference = torch.optim.lr_scheduler.LambdaLR(reference_opt, Schedule(cfg, 40))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    ours = LRScheduler([opt], cfg, 40, peak_lr=3e-3)
    for _ in range(45):
        assert opt.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]
        reference_opt.step(), opt.step()
        reference.step(), ours.step()


def test_peak_lr_comes_from_the_config_not_the_restored_state():
    """A run resumed from another run's checkpoint (a PBT exploit with a mutated lr) keeps its own peak."""
    constant = ScheduleConfig(kind="constant", warmup_steps=0)
    old = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    LRScheduler([old], constant, total_steps=10, peak_lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = LRScheduler([opt], constant, total_steps=10, peak_lr=0.5)
    opt.load_state_dict(old.state_dict())  # the old run's lr comes back with its optimizer state
    assert opt.param_groups[0]["lr"] == 1.0
    sched.load_state_dict({"steps_taken": 4})
    assert opt.param_groups[0]["lr"] == 0.5


def test_groups_with_their_own_peaks_follow_one_curve():
    """Muon's hidden matrices and AdamW's other parameters have different peaks and one schedule."""
    cfg = ScheduleConfig(kind="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.5)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.02},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.001}])
    sched = LRScheduler([opt], cfg, total_steps=10, peak_lr=0.001)
    for step in range(10):
        multiplier = Schedule(cfg, 10)(step)
        assert [g["lr"] for g in opt.param_groups] == [0.02 * multiplier, 0.001 * multiplier]
        assert sched.lr == 0.001 * multiplier
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
