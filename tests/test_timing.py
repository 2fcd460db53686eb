"""duet_jax.timing: the pipelined pass every benchmark case times, and time_pass's budget."""

import jax
import jax.numpy as jnp
import numpy as np

from duet_jax import timing


def test_pipelined_pass_calls_every_entry_in_order_and_runs_again():
    seen = []
    compiled = jax.jit(lambda x, k: x * k)

    def recording(x, k):
        seen.append(int(k))
        return compiled(x, k)

    run = timing.pipelined_pass(recording, [(jnp.ones(3), k) for k in (1, 2, 3)])
    assert run() is None  # results are discarded
    run()  # a list of arguments makes a pass that can be timed again
    assert seen == [1, 2, 3, 1, 2, 3]


def test_pipelined_pass_over_a_generator_runs_once():
    calls = []
    run = timing.pipelined_pass(lambda x: calls.append(x) or jnp.asarray(x),
                                ((i,) for i in range(4)))
    run()
    run()
    assert calls == [0, 1, 2, 3]


def test_time_pass_counts_warmup_apart_and_respects_the_budget():
    calls = []

    def slow_pass():
        calls.append(1)
        np.linalg.svd(np.ones((64, 64)))

    # a pass of ~ms against a 0 s budget: only min_repeats timed passes after the warm-up
    result = timing.time_pass(slow_pass, repeats=50, budget_s=0.0, min_repeats=2)
    assert len(result.repeats_s) == 2 and len(calls) == 3
    assert result.first_call_s > 0 and all(t > 0 for t in result.repeats_s)
