"""jaxft.models.dropout: rate, scaling and mesh independence of the 16-bit-draw dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors
from jax.sharding import NamedSharding, PartitionSpec

from jaxft.models.dropout import Dropout, dropout, keep_mask, keep_threshold


def test_keep_fraction_matches_the_rounded_rate_and_draws_are_independent():
  p_keep = keep_threshold(0.1) / 2**16
  assert keep_threshold(0.1) == 58982 and abs(p_keep - 0.9) < 1e-5
  mask = np.asarray(keep_mask(jax.random.key(0), 0.1, (1000, 2048)))
  n = mask.size
  # 6 standard deviations of a binomial proportion over 2M draws.
  assert abs(mask.mean() - p_keep) < 6 * np.sqrt(p_keep * (1 - p_keep) / n)
  # The two halves of one 32-bit word are independent draws: P(both kept) = p^2.
  pairs = mask[:, 0::2] & mask[:, 1::2]
  assert abs(pairs.mean() - p_keep**2) < 6 * np.sqrt(p_keep**2 * (1 - p_keep**2) / pairs.size)
  # Neighbouring rows are not copies of each other.
  assert (mask[0] != mask[1]).any()


def test_kept_values_are_scaled_to_keep_the_expected_value():
  x = jnp.arange(1, 4097, dtype=jnp.float32).reshape(64, 64)
  y = np.asarray(dropout(jax.random.key(1), 0.25, x))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] * 2**16 / keep_threshold(0.25),
                             rtol=1e-6)
  assert 0.7 < kept.mean() < 0.8
  # Averaged over many keys the output's mean is the input's mean.
  keys = jax.random.split(jax.random.key(2), 400)
  means = jax.vmap(lambda k: dropout(k, 0.5, jnp.ones((256,))).mean())(keys)
  assert abs(float(means.mean()) - 1.0) < 0.01


def test_edge_rates_odd_shapes_and_dtypes():
  x = jnp.ones((3, 5, 7), jnp.bfloat16)
  np.testing.assert_array_equal(dropout(jax.random.key(0), 0.0, x), x)
  np.testing.assert_array_equal(dropout(jax.random.key(0), 1.0, x), jnp.zeros_like(x))
  assert np.asarray(keep_mask(jax.random.key(0), 0.0, (4, 3))).all()
  assert not np.asarray(keep_mask(jax.random.key(0), 1.0, (4, 3))).any()
  # Odd last axis (half a word unused): every element is 0 or the scaled input, and about
  # half are kept at rate 0.5.
  y = np.asarray(dropout(jax.random.key(0), 0.5, jnp.ones((64, 33), jnp.float32)))
  assert set(np.unique(y)) == {0.0, 2.0} and 0.4 < (y > 0).mean() < 0.6
  # bfloat16 keeps its dtype; the scale is applied in float32 before the cast.
  y = np.asarray(dropout(jax.random.key(0), 0.3, x), np.float32)
  assert y.shape == x.shape and dropout(jax.random.key(0), 0.3, x).dtype == jnp.bfloat16
  expected = np.float32(jnp.asarray(2**16 / keep_threshold(0.3), jnp.float32).astype(jnp.bfloat16))
  np.testing.assert_array_equal(y[y > 0], expected)
  assert dropout(jax.random.key(0), 0.5, jnp.float32(2.0)).shape == ()
  with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\], got 1.5"):
    dropout(jax.random.key(0), 1.5, x)


def _flops_per_device(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_masks_are_drawn_where_the_activation_lives():
  """Sharded over the batch, over heads or over the last axis (e.g. LoRA dropout on an MLP
  input split over `tensor`), each of 8 devices hashes only its own eighth of the mask (a
  mask drawn flat and reshaped would be hashed whole on every device), and the output equals
  the unsharded one."""
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  shape = (8, 8, 16, 16)
  key = jax.random.key(3)
  whole = jax.jit(lambda k, x: dropout(k, 0.1, x))
  reference = np.asarray(whole(key, jnp.ones(shape)))
  whole_flops = _flops_per_device(whole, key, jnp.ones(shape))
  for spec in (PartitionSpec("a", "b"), PartitionSpec(None, None, "a", "b"),
               PartitionSpec(("a", "b"))):
    sharding = NamedSharding(mesh, spec)
    x = jax.device_put(jnp.ones(shape), sharding)
    fn = jax.jit(lambda k, x: dropout(k, 0.1, x), out_shardings=sharding)
    assert _flops_per_device(fn, key, x) < 0.15 * whole_flops, spec
    np.testing.assert_array_equal(np.asarray(fn(key, x)), reference)


def test_module_is_a_drop_in_for_nn_dropout():
  x = jnp.ones((4, 32))
  layer = Dropout(0.5)
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  a = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  b = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert set(np.unique(np.asarray(a))) <= {0.0, 2.0} and (np.asarray(a) != np.asarray(b)).any()
  with pytest.raises(errors.InvalidRngError):
    layer.apply({}, x, deterministic=False)

