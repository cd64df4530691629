import pytest
import torch

from lit_ti.errors import UserError
from lit_ti.schedules import parse_schedule, rate_at, schedule_lambda


def test_a1111_example():
    pairs = parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=3000)
    assert pairs == [(0.005, 100), (1e-3, 1000), (1e-5, 3000)]
    assert rate_at(pairs, 0) == 0.005
    assert rate_at(pairs, 99) == 0.005
    assert rate_at(pairs, 100) == 1e-3
    assert rate_at(pairs, 2999) == 1e-5


def test_fractional_steps_are_shares_of_max_steps():
    assert parse_schedule("0.1:0.25, 0.01:0.5, 0.001", max_steps=1000) == [
        (0.1, 250),
        (0.01, 500),
        (0.001, 1000),
    ]


def test_bare_rate_and_minus_one_end_the_list():
    assert parse_schedule("0.005, 0.001:50", max_steps=200) == [(0.005, 200)]
    assert parse_schedule("0.005:-1, 0.001:50", max_steps=200) == [(0.005, 200)]


def test_steps_past_max_are_clipped_and_early_end_is_kept():
    assert parse_schedule("0.1:50, 0.2:5000, 0.3", max_steps=100) == [(0.1, 50), (0.2, 100)]
    assert parse_schedule("0.005:100", max_steps=3000) == [(0.005, 100)]  # training stops at 100


@pytest.mark.parametrize(
    "text",
    [
        "",
        " , ",
        "abc",
        "0.1:abc",
        "0.1:10:20",
        "0.1:0",
        "0.1:-5",
        "0.1:2.5",
        "0.1:100, 0.2:50",
        "-0.1",
        "nan",
        "0.1:1.5",
    ],
)
def test_bad_strings_name_the_key(text):
    with pytest.raises(UserError, match="method.lr_schedule"):
        parse_schedule(text, max_steps=1000)


def test_lambda_keeps_group_ratio():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.0025}], lr=0.005)
    sched = schedule_lambda(opt, parse_schedule("0.005:2, 0.001", max_steps=10))
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0005)
