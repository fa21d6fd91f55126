"""What the routers share: the served memory and the server's settings, handed to endpoints by FastAPI."""
from __future__ import annotations

import dataclasses
import threading
from typing import Annotated

from fastapi import Depends, Request

from deploy.serving.encoding import EncoderBox
from deploy.serving.models import Limits
from deploy.serving.served import ServedMemory


@dataclasses.dataclass
class Serving:
    """One app's state; ``admin_lock`` runs admin changes one at a time."""

    memory_path: str
    served: ServedMemory
    limits: Limits
    encoder: EncoderBox | None
    admin_token: str | None
    add_beam_args: tuple[str, ...]
    admin_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
