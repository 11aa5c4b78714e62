"""The fp32 parity check of the tests that compare with transformers / torch."""
import numpy as np


def assert_fp32_close(got, ref, **kwargs):
  """`got` equals the reference `ref` to 1e-5 relative. The absolute part, for entries near zero, is 1e-5 of
  `ref`'s largest |value|: a fixed atol=1e-5 would be ~2e-5 of the tiny test models' logits (|logit| < 1) and
  loosen every comparison to that. kwargs go to np.testing.assert_allclose (err_msg)."""
  ref = np.asarray(ref)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()), **kwargs)
