import pytest
from omegaconf import OmegaConf

from pruneflow.errors import UserError
from pruneflow.schedules import Schedule


def make(kind: str, total: int = 10, **kw) -> Schedule:
    return Schedule.from_config(OmegaConf.create({"name": kind, **kw}), 0.8, total)


def test_cubic_matches_formula_and_ends_on_target():
    s = make("cubic", total=10)
    # s(k) = 0.8 * (1 - (1 - (k+1)/10)^3)
    assert s.sparsity(0) == pytest.approx(0.8 * (1 - 0.9**3))
    assert s.sparsity(4) == pytest.approx(0.8 * (1 - 0.5**3))
    assert s.sparsity(9) == pytest.approx(0.8)
    assert all(s.is_update_step(k) for k in range(10))


def test_seven_cubic_keep_ratio():
    # SEVEN's code: r_k = keep + (1-keep) * (1 - (k+1)/iter_num)^3 (kept fraction)
    s = Schedule.from_config(OmegaConf.create({"name": "cubic"}), 0.7, 100)
    for k in (0, 17, 50, 99):
        keep = 0.3 + 0.7 * (1 - (k + 1) / 100) ** 3
        assert 1 - s.sparsity(k) == pytest.approx(keep)


def test_warmups_and_frequency():
    s = make("cubic", total=20, initial_warmup=5, final_warmup=5, frequency=3)
    assert s.sparsity(4) == 0 and not s.is_update_step(4)
    assert s.sparsity(14) == pytest.approx(0.8) and s.is_update_step(14)  # ramp ends at step 14
    assert s.sparsity(19) == pytest.approx(0.8)
    assert [k for k in range(20) if s.is_update_step(k)] == [7, 10, 13, 14, 16, 19]


def test_fraction_warmups():
    s = make("cubic", total=100, initial_warmup=0.1, final_warmup=0.2)
    assert (s.initial_warmup, s.final_warmup) == (10, 20)


def test_linear_exponential_oneshot():
    assert make("linear").sparsity(4) == pytest.approx(0.8 * 0.5)
    assert 1 - make("exponential").sparsity(4) == pytest.approx(0.2**0.5)
    one = make("oneshot", initial_warmup=3)
    assert one.sparsity(2) == 0 and one.sparsity(3) == pytest.approx(0.8) and one.is_update_step(3)


def test_schedule_that_cannot_finish_is_an_error():
    s = make("cubic", total=10, initial_warmup=6, final_warmup=4)
    with pytest.raises(UserError, match="cannot reach its target"):
        s.validate()
