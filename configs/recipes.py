"""Fine-tuning recipes side by side, on the quickstart's task (offline).

    python -m launch.train --config=configs/recipes.py:NAME --workdir=/tmp/recipe_NAME

NAME picks the freezing schedule (everything else is configs/quickstart.py:
ImageNet MobileNetV2 at 97 px, lfw_faces 160/40, SGD momentum 0.9, lr 0.01
cosine, batch 16, 6 epochs = 60 steps, freeze.batchnorm=auto):

    head      linear probe: only the new head trains (stages.head).
    last_k    the head and the top 3 blocks from the start, at lr x 0.1.
    all       every block from the start, at lr x 0.1.
    gradual   ULMFiT: head alone, then one more block every epoch (up to 5),
              with discriminative rates (each block 2.6x slower than the one
              above it).
    lp_ft     LP-FT: 2 epochs head only, then every block at lr x 0.1.
    bitfit    2 epochs head only, then biases (and BatchNorm β) of every block.
    lora      2 epochs head only, then rank-4 LoRA adapters on every block's
              1x1 convolutions.

No clipping: with BatchNorm on batch statistics where blocks train (the
default), training the lower blocks is stable without it, and clipping at
norm 1.0 cost 8-13 points on Fashion-MNIST (benchmarks/all_layers.py).
Runtime: 20-45 s each on 2 CPU cores. Measured results: "Presets, and what
they gave" in docs/recipes.md.
"""

from configs import quickstart
from keras_ft import stages

RECIPES = {
    "head": lambda c: stages.head(6),
    "last_k": lambda c: stages.last_k_blocks(3, 6, lr_scale=0.1),
    "all": lambda c: stages.all_blocks(6, lr_scale=0.1),
    "gradual": lambda c: stages.gradual(every=1, blocks=5),
    "lp_ft": lambda c: stages.lp_ft(probe_epochs=2, lr_scale=0.1, finetune_epochs=4),
    "bitfit": lambda c: stages.lp_ft(probe_epochs=2, lr_scale=1.0, finetune_epochs=4),
    "lora": lambda c: stages.lp_ft(probe_epochs=2, lr_scale=1.0, finetune_epochs=4),
}


def get_config(arg=None):
    if arg not in RECIPES:
        raise ValueError(f"Unknown recipe {arg!r}. Choose one of: {', '.join(RECIPES)}.")
    config = quickstart.get_config()
    config.freeze.stages = RECIPES[arg](config)
    if arg == "gradual":
        config.freeze.lr_decay = stages.ULMFIT_LR_DECAY
    if arg in ("bitfit", "lora"):
        config.freeze.method = arg
    return config
