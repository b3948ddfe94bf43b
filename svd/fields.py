"""The request fields of /generate and /generate_task, made from svd/params.py's CONTROLS.

Each field has the description, default and range Swagger shows, and is checked by
pydantic with the control's own check, so a refusal names the field and what it allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator, create_model

from svd.params import CONTROLS, Control, Range


def _text(value: Any) -> Any:
    """A bare word as text: Swagger UI sends every form field as an application/json part, and
    BentoML 1.4.39 hands one that is not JSON (`crop`, unquoted) to validation as bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _number(value: Any) -> Any:
    """A form field's text as the number a numeric choice needs: pydantic matches literals strictly."""
    text = _text(value)
    return int(text) if isinstance(text, str) and text.strip().isdigit() else text


def _whole(control: Control) -> WrapValidator:
    """A number that is not an integer refused with the range, as one outside it is: pydantic's own
    message (`Input should be a valid integer`) would leave the client guessing what is allowed."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be a valid integer {control.allowed}, got {value!r}") from None

    return WrapValidator(check)


def annotated(control: Control) -> Any:
    """The control as a pydantic field type: its OpenAPI schema shows the range, its validator checks it."""
    kind: Any = Literal[control.choices] if control.choices else control.kind
    schema: dict[str, Any] = {}
    if isinstance(control.allowed, Range):
        schema = {"minimum": control.allowed.low}
        if control.allowed.high is not None:
            schema["maximum"] = control.allowed.high
        if control.allowed.step > 1:
            schema["multipleOf"] = control.allowed.step
    before = [BeforeValidator(_text if control.kind is str else _number)] if control.choices else []
    if isinstance(control.allowed, Range) and control.kind is int:
        before.append(_whole(control))
    return Annotated[
        kind | None if control.nullable else kind,
        *before,
        Field(description=control.help, json_schema_extra=schema),
        AfterValidator(control.check),
    ]


GenerateInput: type[BaseModel] = create_model(
    "GenerateInput",
    image=(Annotated[Path, Field(description="The still image: PNG, JPEG, WebP, BMP, GIF or TIFF.")], ...),
    **{control.name: (annotated(control), control.default) for control in CONTROLS},
)
