"""Alias of `voltron_jax.inference.api`, where the notebook API lives since the package regroup (issue 24).

Kept, with this reason, for notebooks and pod images written before the move that import
`voltron_jax.api` (the release check imports it too); new code imports `voltron_jax.inference.api` or
calls `voltron_jax.load`. The alias is the same module object, not a copy.
"""

import sys

from voltron_jax.inference import api as _api

sys.modules[__name__] = _api
