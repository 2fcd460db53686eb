"""``python -m experiments.benchmark``: the same as the ``duet-bench`` console script."""

from experiments.benchmark.main import run

if __name__ == "__main__":
    run()
