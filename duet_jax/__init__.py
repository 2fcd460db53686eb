"""duet_jax: device-cloud parameter generation (DUET / MetaNetwork) in JAX and Flax."""

__version__ = "0.1.0"
