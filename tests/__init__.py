"""mailgw's trial test suite.

Hypothesis runs derandomized and without deadlines by default, so that the suite is
repeatable and never flaky on a loaded machine; ``HYPOTHESIS_PROFILE=thorough`` selects
a heavier, randomized profile for local fuzzing.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=5000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
