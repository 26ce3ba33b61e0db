"""A request's `controlnet` units -> ControlUnits for the pipeline, each refusal an
InvalidRequest naming the unit's field (services.pipelines.controlnet does the work)."""

from __future__ import annotations

import base64

from services.errors import InvalidRequest
from services.pipelines.controlnet import ControlUnit, image_digest, owners, prepare_control_image

# The control image is stretched to the output size (as diffusers does); past this relative
# difference of aspect ratios the stretch would distort it, and the request is refused.
ASPECT_TOLERANCE = 0.02


def control_units(body, pipeline, height: int, width: int) -> tuple[list[ControlUnit], list[dict]]:
    """(the units, their echo for `parameters`: every field but the image, which is hashed)."""
    units = getattr(body, "controlnet", None) or []
    if not units:
        return [], []
    control = pipeline.control
    if control is None:
        raise InvalidRequest(f"model {pipeline.name!r} takes no ControlNet (its denoiser was exported without "
                             f"ControlNet inputs)", field="controlnet")
    if body.cache_interval > 1:
        raise InvalidRequest("cache_interval must be 1 with controlnet: DeepCache's shallow steps skip the "
                             "residuals ControlNets add", field="cache_interval", limit=1)
    out, echo = [], []
    for i, unit in enumerate(units):
        field = f"controlnet[{i}]"
        model = control.models.get(unit.model)
        if model is None:
            bases = owners(pipeline.backend.models()).get(unit.model)
            if bases:
                raise InvalidRequest(f"ControlNet {unit.model!r} was exported for {', '.join(sorted(bases))}, not "
                                     f"model {pipeline.name!r}: a ControlNet works with the base it was made for",
                                     field=f"{field}.model", allowed=sorted(control.models))
            raise InvalidRequest(f"no ControlNet {unit.model!r} for model {pipeline.name!r}", field=f"{field}.model",
                                 allowed=sorted(control.models))
        try:
            raw = base64.b64decode(unit.image, validate=True)
        except ValueError:
            raise InvalidRequest(f"{field}.image is not valid base64", field=f"{field}.image") from None
        check_aspect(raw, height, width, f"{field}.image")
        try:
            image = prepare_control_image(raw, height, width, model.conditioning_channels, unit.preprocess,
                                          tuple(unit.canny_thresholds), max_side=max_control_side(height, width))
        except ValueError as exc:
            raise InvalidRequest(f"{field}.image: {exc}", field=f"{field}.image") from None
        out.append(ControlUnit(unit.model, image, unit.conditioning_scale, unit.guidance_start, unit.guidance_end))
        echo.append({**unit.model_dump(exclude={"image"}), "image_sha256": image_digest(raw)})
    return out, echo


def max_control_side(height: int, width: int) -> int:
    """The largest control image side taken: 4x the output's (it is resized down to it)."""
    return 4 * max(height, width)


def check_aspect(raw: bytes, height: int, width: int, field: str) -> None:
    """Refuses a control image whose aspect ratio is not the output's (read from its header)."""
    import io

    from PIL import Image

    try:
        w, h = Image.open(io.BytesIO(raw)).size
    except Exception as exc:
        raise InvalidRequest(f"{field} is not a decodable PNG/JPEG/WebP image ({type(exc).__name__})",
                             field=field) from None
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise InvalidRequest(f"{field} is {w}x{h} but the output is {width}x{height}: their aspect ratios differ, "
                             f"so resizing would distort it; crop or pad it, or set the output size to match",
                             field=field)
