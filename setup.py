"""vlpjax: vision-language pretraining in JAX/Flax."""
import setuptools

EVAL = ["pycocoevalcap==1.2", "matplotlib"]
# libtpu at the version this jax wants (jax[tpu] pins it): runs on TPU VMs, and compiles for
# TPU topologies ahead of time on any machine (tools/aot_compile.py).
TPU = ["jax[tpu]>=0.10,<0.11"]

setuptools.setup(
    name="vlpjax",
    version="0.1.0",
    description="Vision-language pretraining in JAX/Flax: SigLIP/CLIP, CoCa, prefix-LM VLMs, "
                "video and document models on seqio mixtures.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["vlpjax", "vlpjax.*", "data_mixtures",
                                               "data_mixtures.*", "tools", "tools.*"]),
    package_data={"vlpjax": ["data/assets/*"]},
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12,<0.13",
        "clu>=0.0.12",
        "ml-collections>=1.1",
        "seqio>=0.0.20",
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10",
        "tensorboard",
        "sentencepiece>=0.2",
        "numpy>=2",
        "pillow",
        "safetensors",  # export / import of Hugging Face and plain-tensor checkpoints
    ],
    extras_require={
        # METEOR / SPICE through pycocoevalcap's Java scorers (used where Java is installed;
        # CIDEr-D, BLEU and ROUGE-L are ours and need neither), and tools/plot_metrics.py.
        "eval": EVAL,
        # pycocoevalcap is also the reference our caption metrics are tested against;
        # transformers (with a CPU torch) checks the Hugging Face export and import.
        # libtpu: the tests compile train steps for small TPU topologies ahead of time.
        # filelock: JAX's compilation cache locks with it (tests/conftest.py shares one).
        "test": ["pytest", "pytest-xdist", "filelock", "torch==2.13.0", "transformers",
                 "apache-beam[tfrecord]>=2.77"] + EVAL + TPU,
        # Offline caching of seqio tasks (`python -m vlpjax.data.cache`, docs/data.md).
        "beam": ["apache-beam[tfrecord]>=2.77"],
        "tpu": TPU,
    },
)
