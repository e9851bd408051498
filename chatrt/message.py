"""Message: one transcript entry. Apart from the template so that code which only keeps transcripts (the chat
app's store, records) does not load the tokenizer stack."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One transcript entry. An assistant message keeps the ids the model generated, so the next prompt
    holds exactly the tokens whose KV is cached (re-tokenizing a reply does not always give them back)."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str
    token_ids: tuple[int, ...] | None = None
