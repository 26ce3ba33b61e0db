"""Request bodies: strict types, with JSON Schema's integers (3.0 is one)."""

import pytest
from pydantic import ValidationError

from services.schemas import GANGenerateRequest, GANInterpolateRequest, Txt2ImgRequest


def test_integral_floats_are_accepted_for_integer_fields():
    assert GANGenerateRequest.model_validate({"seed": 3961875.0, "num_images": 2.0}).seed == 3961875
    body = Txt2ImgRequest.model_validate({"prompt": "7", "num_inference_steps": 5.0, "original_size": [64.0, 64]})
    assert body.num_inference_steps == 5 and body.original_size == [64, 64]
    assert GANInterpolateRequest.model_validate({"seeds": [1.0, 2]}).seeds == [1, 2]


@pytest.mark.parametrize("value", [3.5, True, "3", float("nan"), float("inf"), 1e30])
def test_anything_else_is_still_refused(value):
    with pytest.raises(ValidationError):
        GANGenerateRequest.model_validate({"seed": value})
