"""The request fields of /generate and /generate_task, made from svd/base/params.py's CONTROLS.

Each field has the description, default and range Swagger shows, and is checked by
pydantic with the control's own check, so a refusal names the field and what it allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
)

from svd.base.params import CONTROLS, Control, Range
from svd.jobs.webhooks.events import EVENTS


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


def _events(value: Any) -> Any:
    """A form sends the events as one field: `start,completed`, or the JSON list `["start"]`."""
    text = _text(value)
    return [part.strip() for part in text.split(",") if part.strip()] if isinstance(text, str) else text


# What a job takes beyond /generate's fields: where and when to call back.
JobInput: type[BaseModel] = create_model(
    "JobInput",
    __base__=GenerateInput,
    webhook=(
        Annotated[
            str | None,
            Field(
                description="A URL that gets a signed POST (Standard Webhooks) when the job starts and when it ends; "
                "only public addresses unless the server's SVD_WEBHOOK_HOSTS allows others.",
                max_length=2000,
            ),
        ],
        None,
    ),
    webhook_events_filter=(
        Annotated[
            list[Literal[EVENTS]],  # type: ignore[valid-type]
            BeforeValidator(_events),
            Field(description="Which events call the webhook: start, completed (the end, always sent)."),
        ],
        list(EVENTS),
    ),
)
# The fields a job takes that are not the generation's own.
JOB_ONLY = tuple(name for name in JobInput.model_fields if name not in GenerateInput.model_fields)
