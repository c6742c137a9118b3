import pytest

from keras_ft import stages
from keras_ft.stages import Stage


def test_presets():
    assert stages.parse(stages.head(2)) == [Stage(epochs=2, blocks=0)]
    assert stages.parse(stages.last_k_blocks(3, 4, 0.5)) == [Stage(epochs=4, blocks=3, lr_scale=0.5)]
    assert stages.parse(stages.all_blocks(1)) == [Stage(epochs=1, blocks=-1)]
    assert stages.parse(stages.gradual(every=10, blocks=2, unit="steps")) == [
        Stage(steps=10, blocks=0), Stage(steps=10, blocks=1), Stage(steps=10, blocks=2),
    ]
    assert stages.parse(stages.lp_ft(3, lr_scale=0.1)) == [
        Stage(epochs=3, blocks=0), Stage(epochs=1, blocks=-1, lr_scale=0.1),
    ]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"epochs": 1, "block": 2}, "unknown key"),
        ({"blocks": 2}, "exactly one of 'epochs' or 'steps'"),
        ({"epochs": 1, "steps": 3}, "exactly one of 'epochs' or 'steps'"),
        ({"epochs": 1, "blocks": -2}, "blocks must be an integer >= -1"),
        ({"epochs": 1, "lr_scale": 0}, "lr_scale must be a number > 0"),
    ],
)
def test_bad_stages_name_the_entry(entry, message):
    with pytest.raises(ValueError, match=message):
        stages.parse([{"epochs": 1}, entry])
    with pytest.raises(ValueError, match="empty"):
        stages.parse([])


def test_stage_index_by_epoch_and_by_step():
    by_epoch = stages.parse([{"epochs": 2}, {"epochs": 1, "blocks": 1}])
    assert [stages.stage_index(by_epoch, e, 0, None) for e in range(5)] == [0, 0, 1, 1, 1]
    mixed = stages.parse([{"steps": 3}, {"epochs": 1, "blocks": 1}, {"steps": 2, "blocks": 2}])
    # 4 steps an epoch: stage 0 for steps 0-2, stage 1 for 3-6, stage 2 after.
    got = [stages.stage_index(mixed, s // 4, s, 4) for s in range(10)]
    assert got == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="steps per epoch"):
        stages.stage_index(mixed, 0, 0, None)


def test_block_lr_multipliers_decay_from_the_top():
    assert stages.block_lr_multipliers(3, 0.5) == [0.125, 0.25, 0.5]
    ulmfit = stages.block_lr_multipliers(2, stages.ULMFIT_LR_DECAY)
    assert ulmfit[1] == pytest.approx(1 / 2.6) and ulmfit[0] == pytest.approx(1 / 2.6**2)
    with pytest.raises(ValueError, match="lr_decay"):
        stages.block_lr_multipliers(3, 1.5)
