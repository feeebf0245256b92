"""A batch analysis that fails on purpose, for the Ray engine's tests (tests/test_ray_engine.py).

Ray workers import a batch analysis by its "module:function" name, so a test's stand-in has to
live in an importable module rather than in the test file."""

from __future__ import annotations

FAILING_PROMPT = 4


def sad_analysis_failing_on_prompt_4(context):
    """The 2024 method's batch analysis, except that the batch holding prompt 4 raises."""
    from catalog.methods.sad.batch import batch_analysis

    analyse = batch_analysis(context)

    def analyse_or_fail(ids):
        if FAILING_PROMPT in ids:
            raise ValueError(f"made to fail on prompt {FAILING_PROMPT}")
        return analyse(ids)

    return analyse_or_fail
