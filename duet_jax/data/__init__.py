"""Data: raw files, TFDS builders, sample protocol, batching."""

# Registers the TFDS builders, so tfds.builder("duet_movielens_100k") works after
# `import duet_jax.data`.
from duet_jax.data import tfds_builders as tfds_builders
