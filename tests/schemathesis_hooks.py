"""Schemathesis hooks of the API fuzz test (loaded through ``SCHEMATHESIS_HOOKS``).

``positive_data_acceptance`` is told to allow 400, because the schema cannot say that
``npy`` must decode to a .npy array; this check takes back that allowance for the part
the schema does pin down: every schema-valid body with ``inputs`` must be answered 200."""

from __future__ import annotations

import schemathesis


@schemathesis.check
def valid_inputs_are_answered(ctx, response, case) -> None:
    """A schema-valid ``inputs`` body is a prediction: 200, nothing else."""
    meta = case.meta
    positive = meta is not None and meta.generation.mode.is_positive
    if positive and case.method == "POST" and isinstance(case.body, dict) and "inputs" in case.body:
        if response.status_code != 200:
            raise AssertionError(
                f"schema-valid inputs body answered {response.status_code}, expected 200: {response.text[:300]}"
            )
